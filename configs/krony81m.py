# Krony-PT-81M: GPT-2 (124M) with every MLP matrix replaced by one Kronecker product
# A (x) B, A = (1536, 384), B = (2, 2) for c_fc (paper Table 1: 589,828 parameters per
# matrix, 81,972,576 in all; A = (768, 768), B = (4, 1) is the other shape of this size).
# Initialised from GPT-2 with the adaptive-normalised Van Loan decomposition (paper 3.3.2).
# Pre-training recipe of paper section 4.1: 24 sequences of 1024 tokens per forward,
# gradient accumulation 5 (120 sequences, ~122k tokens per step), AdamW, cosine learning
# rate 6e-5 -> 6e-6 after a 500-1500-step warm-up, ~3 epochs of OpenWebText, bf16, one A100.
#
#   python prepare_owt.py                                   # once: data/openwebtext (~17 GB)
#   python train.py configs/krony81m.py                     # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py configs/krony81m.py \
#       --gradient_accumulation_steps=8 --batch_size=15     # 8 GPUs, still 120 sequences per step
# then the big-batch phase: configs/krony81m_finetune.py

out_dir = "out-krony81m"
data_dir = "data/openwebtext"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1536, 384)    # A for c_fc (3072, 768); c_proj (768, 3072) uses A = (384, 1536)
kron_factors = 1
kron_scalars = False
kron_init = "vl-norm"
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
