# Krony-PT-81M: GPT-2 (124M) with every MLP matrix replaced by one Kronecker product
# A (x) B, A = (1536, 384), B = (2, 2) for c_fc (paper Table 1: 589,828 parameters per
# matrix, 81,972,576 in all; A = (768, 768), B = (4, 1) is the other shape of this size).
# Initialised from GPT-2 with the adaptive-normalised Van Loan decomposition (paper 3.3.2).
# Training: the pre-training recipe of paper section 4.1, which is train.py's defaults:
# 24 sequences of 1024 tokens per forward, gradient accumulation 5 (120 sequences, 122,880
# tokens per step), AdamW, cosine 6e-5 -> 6e-6 after 1000 warm-up steps, 219,726 steps
# (~3 epochs of OpenWebText), bf16, one A100.
#
#   python prepare_owt.py                                   # once: data/openwebtext (~17 GB)
#   python train.py configs/krony81m.py                     # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py configs/krony81m.py \
#       --gradient_accumulation_steps=8 --batch_size=15     # 8 GPUs, still 120 sequences per step
# then the big-batch phase: configs/krony81m_finetune.py

out_dir = "out-krony81m"
init_from = "gpt2"

mlp = "kron"
kron_shape = (1536, 384)    # A for c_fc (3072, 768); c_proj (768, 3072) uses A = (384, 1536)
kron_init = "vl-norm"

compile = True
