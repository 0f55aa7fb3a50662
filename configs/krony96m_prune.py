# Krony-PT-96M, pruning initialisation (paper 3.3.3 and Table 5): A = (1536, 768),
# B = (2, 1) for c_fc (1,179,650 parameters per matrix, 96,128,304 in all, Table 1).
# "prune" keeps every other row of W as A and sets B = [1, 0.1] (no SVD); the paper's
# best 96M model. Training: recipe of section 4.1 (train.py's defaults), ~3 epochs.
#
#   python train.py configs/krony96m_prune.py
#   torchrun --standalone --nproc_per_node=8 train.py configs/krony96m_prune.py --gradient_accumulation_steps=8 --batch_size=15

out_dir = "out-krony96m-prune"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1536, 768)    # A for c_fc (3072, 768): B = (2, 1); c_proj uses A = (768, 1536), B = (1, 2)
kron_init = "prune"

compile = True
