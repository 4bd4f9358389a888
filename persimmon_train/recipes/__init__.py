"""Every recipe (job) as a module of the package, so a plain wheel can run them all.

`persimmon-train <job> ...` (persimmon_train.recipes.main) and the top-level `recipes/<job>.py`
files both call `run(argv)` of the module named here. Training jobs (finetune, classify, tag,
dpo, reward, evaluate) and prepare / estimate take Hydra overrides; export, generate and convert-adept
take plain key=value pairs.
"""

# job name -> (module, one-line description); the order is the order `persimmon-train ls` prints.
JOBS = {
    "finetune": ("finetune", "causal-LM fine-tuning, full or LoRA (Hydra config: finetune)"),
    "classify": ("classify", "sequence classification (Hydra config: classify)"),
    "tag": ("tag", "token classification / NER tags (Hydra config: tag)"),
    "dpo": ("dpo", "preference tuning: DPO on chosen/rejected pairs, LoRA or full (Hydra config: dpo)"),
    "reward": ("reward", "reward model: Bradley-Terry on chosen/rejected pairs (Hydra config: reward)"),
    "evaluate": ("evaluate", "evaluate a model folder or checkpoint (Hydra config: evaluate)"),
    "estimate": ("estimate", "what one rank of a run will hold in memory, from its config (no weights read)"),
    "prepare": ("prepare", "tokenize and pack a run's data into the cache (CPU), print rows and packing"),
    "export": ("export", "export a training checkpoint to a Hugging Face folder or PEFT adapter"),
    "generate": ("generate", "generate text from an export or a checkpoint"),
    "convert-adept": ("convert_adept", "convert ADEPT's original release to a Hugging Face folder"),
}

# The Hydra jobs: each has persimmon_train/conf/<job>.yaml.
HYDRA_JOBS = ("finetune", "classify", "tag", "evaluate", "dpo", "reward")
