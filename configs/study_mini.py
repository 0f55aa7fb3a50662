# The paper's comparisons on a laptop: a 2-core CPU, offline, under an hour. The study first trains
# its own dense teacher, a small GPT-2 (4 layers, width 128, GPT-2's BPE and vocabulary) on
# tinyshakespeare, then compresses its MLPs in every way the paper compares and recovers each
# compressed model for the same budget on the same batches:
#
#   python study.py configs/study_mini.py
#   python study.py configs/study_mini.py --data_prepare="{'dataset': 'my.txt', 'val_fraction': 0.1}" \
#       --data_dir=data/mine --out_dir=out-study-mine          # any corpus
#
# Sizes: the teacher's MLP matrices are (512, 128) and (128, 512). B 2x2 keeps a quarter of their
# weights (GPT-2's 81M class), B 1x2 half (the 96M class, in the orientation prune's published results
# used). Four ways of spending the B 2x2 budget, about 16,400 weights per matrix: 1 factor of B 2x2,
# 2 factors of B 4x2, 4 factors of B 4x4 with scalars, low-rank at rank 25 (`python lowrank.py
# plan-rank --kron_shape 256 64 --n_embd 128 --n_layer 4`). The calibrated rows fit the same setups to
# the teacher's activations on 32,768 training tokens (calib_tokens) instead of to its weights alone.
# A Shakespeare-sized teacher is not GPT-2: see the README for what this shows and what it does not.

data_dir = "data/shakespeare-study"
data_prepare = dict(dataset="../shared/data/tinyshakespeare.txt", val_fraction=0.1,
                    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
out_dir = "out-study-mini"

teacher = dict(name="teacher", init_from="scratch", n_layer=4, n_head=4, n_embd=128, dropout=0.1,
               max_iters=800, learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, eval_interval=100)

_kron = dict(mlp="kron")
_calib = 32768                  # calibration tokens of the training split (about a tenth of it)
runs = [
    dict(name="vl-norm B2x2", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm"),
    dict(name="vl-norm B2x2, seed 2", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm", seed=2),
    dict(name="vl B2x2", **_kron, kron_b_shape=(2, 2), kron_init="vl"),
    dict(name="vl-norm B2x2 + permute", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm",
         kron_permute="hidden+residual"),
    dict(name="vl B2x2 + permute", **_kron, kron_b_shape=(2, 2), kron_init="vl", kron_permute="hidden+residual"),
    dict(name="random B2x2", **_kron, kron_b_shape=(2, 2), kron_init="random"),
    dict(name="scratch B2x2", **_kron, kron_b_shape=(2, 2), init_from="scratch", n_layer=4, n_head=4, n_embd=128,
         learning_rate=1e-3, min_lr=1e-4),
    dict(name="vl-norm B2x2 + KD", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm", distill_from="teacher",
         distill_alpha=0.5, distill_temperature=2.0),
    dict(name="2 factors B4x2", **_kron, kron_b_shape=(4, 2), kron_factors=2, kron_init="vl-norm"),
    dict(name="4 factors B4x4 + scalars", **_kron, kron_b_shape=(4, 4), kron_factors=4, kron_scalars=True,
         kron_init="vl-norm"),
    dict(name="lowrank r=25", mlp="lowrank", lowrank_rank=25),
    dict(name="prune B1x2", **_kron, kron_b_shape=(1, 2), kron_init="prune", prune_b_second=0.0),
    dict(name="vl-norm B1x2", **_kron, kron_b_shape=(1, 2), kron_init="vl-norm"),
    # the same budgets, fitted to what the teacher computes (calibrate.py)
    dict(name="vl-norm B2x2, calibrated", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm", calib_tokens=_calib),
    dict(name="vl-norm B2x2, calibrated sequentially", **_kron, kron_b_shape=(2, 2), kron_init="vl-norm",
         calib_tokens=_calib, calib_sequential=True),
    dict(name="2 factors B4x2, calibrated", **_kron, kron_b_shape=(4, 2), kron_factors=2, kron_init="vl-norm",
         calib_tokens=_calib),
    dict(name="2 factors B4x2, calibrated sequentially", **_kron, kron_b_shape=(4, 2), kron_factors=2,
         kron_init="vl-norm", calib_tokens=_calib, calib_sequential=True),
    dict(name="4 factors B4x4 + scalars, calibrated", **_kron, kron_b_shape=(4, 4), kron_factors=4,
         kron_scalars=True, kron_init="vl-norm", calib_tokens=_calib),
    dict(name="lowrank r=25, calibrated", mlp="lowrank", lowrank_rank=25, calib_tokens=_calib),
    dict(name="vl-norm B1x2, calibrated", **_kron, kron_b_shape=(1, 2), kron_init="vl-norm", calib_tokens=_calib),
]

# every run: the same budget and recipe (the teacher above sets its own)
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 150                 # 150 steps x 2,048 tokens = 307k tokens, about one epoch
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 15
eval_interval = 50
eval_iters = 10
weight_decay = 0.1
device = "cpu"
dtype = "float32"
