# Krony-PT-96M, classic Van Loan initialisation (paper 3.3.1, Tables 5 and 8): the same
# shape as krony96m_prune.py, A = (1536, 768), B = (2, 1), 96,128,304 parameters, but the
# plain Frobenius-optimal VL factors without norm rescaling ("vl"). The paper compares it with
# prune and vl-norm. Training: recipe of section 4.1 (train.py's defaults), ~3 epochs.
#
#   python train.py configs/krony96m_vl.py

out_dir = "out-krony96m-vl"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1536, 768)    # A for c_fc (3072, 768): B = (2, 1)
kron_init = "vl"

compile = True
