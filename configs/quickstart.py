# Quickstart: see the loss drop on a laptop CPU in a few minutes, offline, before renting a GPU.
#
#   python train.py configs/quickstart.py
#
# On first use it tokenises ../shared/data/tinyshakespeare.txt (1.1 MB, ~330k GPT-2
# tokens; paragraphs separated by blank lines are the documents; downloaded once into
# data/shakespeare when there is no local copy) into data/shakespeare
# with prepare_owt.py. The GPT-2 tokenizer needs tiktoken's BPE files: the network,
# or TIKTOKEN_CACHE_DIR (../shared/tiktoken_cache is used automatically when present).
#
# The model is a small GPT trained from scratch (no download) whose MLPs are already
# Kronecker-factored (paper section 3: W = A (x) B, here A (128, 32) (x) B (4, 4) for c_fc).
# Expect the loss to fall from ~10.8 (uniform over 50257 tokens) to ~6 within 300 steps.
#
# To start from the real GPT-2 instead (needs the hub or a local copy; slow on CPU):
#   python train.py configs/quickstart.py --init_from=gpt2 --kron_shape="(1536,384)" \
#       --learning_rate=6e-5 --min_lr=6e-6 --block_size=128 --batch_size=4 --out_dir=out-quickstart-gpt2
# (init_from=gpt2 takes n_layer/n_head/n_embd from GPT-2, compresses its MLPs with vl-norm
#  and prints the per-layer approximation error; init_from=DIR takes a local HF directory.)

out_dir = "out-quickstart"
data_dir = "data/shakespeare"
# the local copy when present (offline CI), else downloaded once from char-rnn's repository
data_prepare = dict(dataset="../shared/data/tinyshakespeare.txt", val_fraction=0.05,
                    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")

init_from = "scratch"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
mlp = "kron"
kron_shape = (128, 32)      # A for c_fc (512, 128): B = (4, 4); c_proj uses A (32, 128)

batch_size = 8
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 1e-3        # a small model from scratch takes a larger rate than the paper's 6e-5
min_lr = 1e-4
warmup_iters = 20
lr_decay_iters = 300
weight_decay = 0.1

eval_interval = 100
eval_iters = 10
log_interval = 10

device = "cpu"
dtype = "float32"
compile = False

_tokens_per_iter = batch_size * gradient_accumulation_steps * block_size        # 1,024
_epochs = max_iters * _tokens_per_iter / 330_000                                 # ~0.9 of tinyshakespeare
