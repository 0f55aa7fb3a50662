# The paper's comparisons at real scale, on one GPU: GPT-2 (124M) as the teacher, OpenWebText, and
# one training budget for every run. Each run starts from GPT-2 compressed as it says (a run with
# init_from="scratch" builds the same model from random weights instead), trains on the same
# batches for the same number of tokens, and is evaluated on val.bin, WikiText-103, WikiText-2 and
# LAMBADA with the paper's protocol.
#
#   python prepare_owt.py                                  # once: data/openwebtext (~17 GB)
#   python study.py configs/study_gpt2.py
#
# Budget per run: 2,000 steps of 122,880 tokens (the paper's batch) = 246M tokens, 2.7% of one
# OpenWebText epoch (the paper trains ~3 epochs). Estimated time per run on one A100 80 GB with
# bf16 and compile=True, at ~100k tokens/s for the 81M class (an estimate, not a measurement):
# ~45 minutes, ~12 hours for the 16 runs; the 92M class with 4 factors and the from-scratch run
# cost about the same. Halve max_iters for a first look.

teacher = "gpt2"
data_dir = "data/openwebtext"
out_dir = "out-study-gpt2"
eval_datasets = ["wikitext-103", "wikitext-2", "lambada"]
eval_protocol = "paper"

_kron = dict(mlp="kron")
_calib = 65536
runs = [
    # the 81M class (B 2x2): the inits of the paper, and what it competes with
    dict(name="81M vl-norm", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm"),
    dict(name="81M vl", **_kron, kron_b_shape=(2, 2), kron_init="vl"),
    dict(name="81M random", **_kron, kron_b_shape=(2, 2), kron_init="random"),
    dict(name="81M scratch", **_kron, kron_b_shape=(2, 2), init_from="scratch"),
    dict(name="81M vl-norm + KD", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm", distill_from="teacher",
         distill_alpha=0.5, distill_temperature=2.0),
    dict(name="81M lowrank r=153", mlp="lowrank", lowrank_rank=153),     # `python lowrank.py plan-rank --kron_shape 1536 384`
    # more factors at about the same size
    dict(name="80M 2 factors", **_kron, kron_shape=(1024, 256), kron_factors=2, kron_init="vl-norm"),
    dict(name="92M 4 factors + scalars", **_kron, kron_shape=(1024, 256), kron_factors=4, kron_scalars=True,
         kron_init="vl-norm"),
    # the 96M class: prune as the published results used it, against Van Loan
    dict(name="96M prune", **_kron, kron_shape=(3072, 384), kron_init="prune", prune_b_second=0.0),
    dict(name="96M vl-norm", **_kron, kron_shape=(3072, 384), kron_init="vl-norm"),
    # the smallest class
    dict(name="67M vl-norm", **_kron, kron_shape=(64, 32), kron_init="vl-norm"),
    # the same budgets fitted to GPT-2's activations on 65,536 OpenWebText tokens (calibrate.py)
    dict(name="81M vl-norm, calibrated", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm", calib_tokens=_calib),
    dict(name="81M lowrank r=153, calibrated", mlp="lowrank", lowrank_rank=153, calib_tokens=_calib),
    dict(name="80M 2 factors, calibrated", **_kron, kron_shape=(1024, 256), kron_factors=2, kron_init="vl-norm",
         calib_tokens=_calib),
    dict(name="92M 4 factors + scalars, calibrated", **_kron, kron_shape=(1024, 256), kron_factors=4,
         kron_scalars=True, kron_init="vl-norm", calib_tokens=_calib),
    dict(name="96M vl-norm, calibrated", **_kron, kron_shape=(3072, 384), kron_init="vl-norm", calib_tokens=_calib),
]

max_iters = 2000            # every run: 2,000 steps x 122,880 tokens
warmup_iters = 100
lr_decay_iters = 2000
eval_interval = 250
eval_iters = 100
compile = True
