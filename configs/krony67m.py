# Krony-PT-67M (paper Table 1, the smallest class): A = (64, 32), B = (48, 24) for c_fc,
# 3,200 parameters per MLP matrix, 67,893,504 in all; vl-norm initialisation. The MLPs keep
# only 0.14% of their weights, so this class needs the longest training: ~4 epochs (4.1).
#
#   python train.py configs/krony67m.py

out_dir = "out-krony67m"
data_dir = "data/openwebtext"
init_from = "gpt2"

mlp = "kron"
kron_shape = (64, 32)    # A for c_fc (3072, 768): B = (48, 24)
kron_factors = 1
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
