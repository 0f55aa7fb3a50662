# Krony-PT-96M, classic Van Loan initialisation (paper 3.3.1, Tables 5 and 8): the same
# shape as krony96m_prune.py, A = (1536, 768), B = (2, 1), 96,128,304 parameters, but the
# plain Frobenius-optimal VL factors without norm rescaling ("vl"). The paper compares it with
# prune and vl-norm. Training recipe of section 4.1 (see configs/krony81m.py), ~3 epochs.
#
#   python train.py configs/krony96m_vl.py

out_dir = "out-krony96m-vl"
data_dir = "data/openwebtext"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1536, 768)    # A for c_fc (3072, 768): B = (2, 1)
kron_factors = 1
kron_scalars = False
kron_init = "vl"
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
