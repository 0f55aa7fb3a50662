# Krony-PT-81M, second phase (paper section 4.1): start from the best checkpoint of the
# pre-training run (configs/krony81m.py), train one more epoch of OpenWebText with a big
# batch of ~320 sequences (~327k tokens) per step and a small constant learning rate 6e-6.
# init_from is a checkpoint path: weights only, fresh optimizer, iteration 0; the
# architecture comes from the checkpoint.
#
#   python train.py configs/krony81m_finetune.py
#   torchrun --standalone --nproc_per_node=8 train.py configs/krony81m_finetune.py
#   python eval_ppl.py --model out-krony81m-finetune/ckpt_best.pt --datasets wikitext-103,wikitext-2,lambada --protocol paper

out_dir = "out-krony81m-finetune"
init_from = "out-krony81m/ckpt_best.pt"

batch_size = 20
gradient_accumulation_steps = 16     # 320 sequences per step; 16 divides over 1, 2, 4, 8 or 16 GPUs
_tokens_per_iter = batch_size * 1024 * gradient_accumulation_steps          # 327,680
max_iters = int(9.0e9 / _tokens_per_iter)                                    # 27,465 steps = 1 epoch

learning_rate = 6e-6
decay_lr = False                     # constant
warmup_iters = 0
eval_interval = 500

compile = True
