# Krony-PT-96M, pruning initialisation (paper 3.3.3 and Table 5): A = (1536, 768),
# B = (2, 1) for c_fc (1,179,650 parameters per matrix, 96,128,304 in all, Table 1).
# "prune" keeps every other row of W as A and sets B = [1, 0.1] (no SVD); the paper's
# best 96M model. Training recipe of section 4.1 (see configs/krony81m.py), ~3 epochs.
#
#   python train.py configs/krony96m_prune.py
#   torchrun --standalone --nproc_per_node=8 train.py configs/krony96m_prune.py --gradient_accumulation_steps=8 --batch_size=15

out_dir = "out-krony96m-prune"
data_dir = "data/openwebtext"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1536, 768)    # A for c_fc (3072, 768): B = (2, 1); c_proj uses A = (768, 1536), B = (1, 2)
kron_factors = 1
kron_scalars = False
kron_init = "prune"
dropout = 0.0

batch_size = 24
block_size = 1024
gradient_accumulation_steps = 5
_tokens_per_iter = batch_size * block_size * gradient_accumulation_steps    # 122,880
_owt_tokens = 9.0e9
_epochs = 3
max_iters = int(_epochs * _owt_tokens / _tokens_per_iter)                  # 219,726 steps = 3 epochs

learning_rate = 6e-5
min_lr = 6e-6
decay_lr = True
warmup_iters = 1000
lr_decay_iters = max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
log_interval = 10

device = "auto"
dtype = "bfloat16"
compile = True
