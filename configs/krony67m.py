# Krony-PT-67M (paper Table 1, the smallest class): A = (64, 32), B = (48, 24) for c_fc,
# 3,200 parameters per MLP matrix, 67,893,504 in all; vl-norm initialisation. The MLPs keep
# only 0.14% of their weights, so this class trains longest: ~4 epochs (section 4.1), with
# the longest warm-up of the paper's 500-1500 range. Otherwise train.py's defaults (4.1).
#
#   python train.py configs/krony67m.py

out_dir = "out-krony67m"
init_from = "gpt2"

mlp = "kron"
kron_shape = (64, 32)    # A for c_fc (3072, 768): B = (48, 24)
kron_init = "vl-norm"

max_iters = int(4 * 9.0e9 / (24 * 1024 * 5))    # 292,968 steps = 4 epochs at 122,880 tokens per step
warmup_iters = 1500

compile = True
