# Krony-PT-81M, second phase (paper section 4.1): start from the best checkpoint of the
# pre-training run (configs/krony81m.py), train one more epoch of OpenWebText with a big
# batch of ~320 sequences (~327k tokens) per step and a small constant learning rate 6e-6.
# init_from is a checkpoint path: weights only, fresh optimizer, iteration 0.
#
#   python train.py configs/krony81m_finetune.py
#   torchrun --standalone --nproc_per_node=8 train.py configs/krony81m_finetune.py
#   python eval_ppl.py --model out-krony81m-finetune/ckpt_best.pt --datasets wikitext-103,wikitext-2,lambada --protocol paper

out_dir = "out-krony81m-finetune"
data_dir = "data/openwebtext"
init_from = "out-krony81m/ckpt_best.pt"

# the architecture comes from the checkpoint; these must agree with it (checked on load)
mlp = "kron"
kron_shape = (1536, 384)
kron_factors = 1
kron_scalars = False
dropout = 0.0

batch_size = 20
block_size = 1024
gradient_accumulation_steps = 16     # 320 sequences per step; 16 divides over 1, 2, 4, 8 or 16 GPUs
_tokens_per_iter = batch_size * block_size * gradient_accumulation_steps    # 327,680
_owt_tokens = 9.0e9
max_iters = int(1 * _owt_tokens / _tokens_per_iter)                        # 27,465 steps = 1 epoch

learning_rate = 6e-6
decay_lr = False                     # constant
warmup_iters = 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 500
eval_iters = 200
log_interval = 10

device = "auto"
dtype = "bfloat16"
compile = True
