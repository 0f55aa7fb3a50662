# Krony-PT-80M-2-factors (paper Table 5): two Kronecker factors A_i = (1024, 256),
# B_i = (3, 3) per MLP matrix, vl-norm initialisation, 80,400,048 parameters (with position
# embeddings). Recipe of section 4.1 (train.py's defaults); the paper trains the smaller
# models ~4 epochs.
#
#   python train.py configs/krony80m_2factors.py

out_dir = "out-krony80m-2factors"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1024, 256)    # A for c_fc (3072, 768): B = (3, 3)
kron_factors = 2
kron_init = "vl-norm"

max_iters = int(4 * 9.0e9 / (24 * 1024 * 5))    # 292,968 steps = 4 epochs at 122,880 tokens per step
warmup_iters = 1500

compile = True
