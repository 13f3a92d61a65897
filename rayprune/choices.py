"""The names each option may take, in a module that imports nothing heavy.

The config validates against these, and Ray Data actors that only copy rows import the
config's module tree: keeping torch out of it saves every such actor about two seconds
of start-up. The modules that implement each choice import their tuple from here.
"""

NORMS: tuple[str, ...] = ("linf", "l2")
# Evaluation attacks; AUTOATTACK is AutoAttack's standard version, in its order.
EVAL_ATTACKS: tuple[str, ...] = ("clean", "pgd_ce", "pgd_cw", "apgd_ce", "apgd_t", "fab_t", "square")
AUTOATTACK: tuple[str, ...] = ("apgd_ce", "apgd_t", "fab_t", "square")
# How the attacks run: "autoattack" each on the samples still robust, in order (a cascade);
# "every_attack" each on every clean-correct sample (per-attack accuracies stand alone).
EVAL_PROTOCOLS: tuple[str, ...] = ("autoattack", "every_attack")
AT_LOSSES: tuple[str, ...] = ("pgd_at", "trades")
# Training precision: fp32, or autocast to bf16 / fp16 (with a gradient scaler).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
# How the final training reads its rows: every worker's shard in memory, streamed from Ray
# Data, or chosen by size ("auto").
DATA_LOADING: tuple[str, ...] = ("auto", "memory", "stream")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "one_cycle")
MODEL_NAMES: tuple[str, ...] = ("small_cnn", "preact_resnet18", "wide_resnet", "wrn_28_10", "wrn_70_16")
WEIGHTINGS: tuple[str, ...] = ("uniform", "inverse_distance", "exp")
METRICS: tuple[str, ...] = ("euclidean", "cosine")
# Neighbour search: blocked exact, faiss HNSW ("approx"), faiss IVF-Flat ("ivf").
METHODS: tuple[str, ...] = ("exact", "approx", "ivf")
