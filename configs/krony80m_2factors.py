# Krony-PT-80M-2-factors (paper Table 5): two Kronecker factors A_i = (1024, 256),
# B_i = (3, 3) per MLP matrix, vl-norm initialisation, 80,400,048 parameters (with position
# embeddings). Recipe of section 4.1; the paper trains the smaller models ~4 epochs.
#
#   python train.py configs/krony80m_2factors.py

out_dir = "out-krony80m-2factors"
data_dir = "data/openwebtext"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1024, 256)    # A for c_fc (3072, 768): B = (3, 3)
kron_factors = 2
kron_scalars = False
kron_init = "vl-norm"
dropout = 0.0

batch_size = 24
block_size = 1024
gradient_accumulation_steps = 5
_tokens_per_iter = batch_size * block_size * gradient_accumulation_steps    # 122,880
_owt_tokens = 9.0e9
_epochs = 4
max_iters = int(_epochs * _owt_tokens / _tokens_per_iter)                  # 292,968 steps = 4 epochs

learning_rate = 6e-5
min_lr = 6e-6
decay_lr = True
warmup_iters = 1500
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
