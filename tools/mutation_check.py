"""Mutation check: does a test fail when the code it guards is broken on purpose?

    python tools/mutation_check.py                  # every mutant (a few minutes on 2 cores)
    python tools/mutation_check.py --group loss     # loss|packing|trainer|features|inputs|persist|preempt|planner|dpo
    python tools/mutation_check.py --only loss.no_shift packing.no_first_label_mask
    python tools/mutation_check.py --list
    python tools/mutation_check.py --only features.top_p_ignored --tests tests/export/test_generate.py

Each mutant is one textual edit (an operator swapped, a line dropped, an option ignored) to one
source file, with the tests that should catch it. The checkout is copied to a temporary folder
(the committed HEAD, or with --worktree the files as they are now), each mutant is applied there alone, its tests run
there with that copy first on PYTHONPATH (the test helpers pin subprocesses to the copy too), and
the copy is restored. The working tree is never touched, so it is safe beside other work.

A mutant is KILLED when its tests fail, SURVIVED when they pass. Mutants marked `equivalent` are
expected to survive (the edit cannot change behaviour the tests can see; the reason is given) and
are listed in docs/testing.md; any other survivor makes the exit status 1. Tests that already fail
on the unmutated copy are reported and deselected, so they neither kill nor hide a mutant (a
mutant left with no test to run is reported as NO TESTS and also fails the check).

mutmut would generate mutants automatically, but it re-runs whole suites per mutant (far beyond a
2-core CI budget for this project) and its operator mutants are mostly equivalent here; a short
curated list that states what each test is for is the reviewable artifact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    equivalent: str = ""  # why it cannot be killed (expected survivor); empty: must be killed
    extra: list[str] = field(default_factory=list)  # extra pytest args, e.g. ["-m", "not slow"]


LOSS = "persimmon_train/model/loss.py"
RESHARD = "persimmon_train/parallel/zero_reshard.py"
RESHARD_TESTS = "tests/distributed/test_checkpoints.py::"  # 2-rank DeepSpeed runs: ~1 minute a mutant
PACKING = "persimmon_train/data/packing.py"
TRAINER = "persimmon_train/training/trainer.py"
TASKS = "persimmon_train/training/tasks.py"  # the trainer's per-task counting and eval collection
LOSS_TESTS = [
    "tests/model/test_loss.py",
    "tests/model/test_parity.py::test_causal_lm_loss_matches",
    "tests/training/test_loop.py::test_update_does_not_depend_on_micro_batch_split",
]
PACKING_TESTS = ["tests/data/test_packing.py"]
RUN = "persimmon_train/training/run.py"
RUN_FOLDER = "persimmon_train/training/run_folder.py"
CHECKPOINTS = "persimmon_train/storage/checkpoints.py"
RUN_FOLDER_TESTS = "tests/training/test_run_folder.py"
PERSISTENCE_TESTS = "tests/recipes/test_persistence.py::"  # real recipe runs: ~15-30 s a mutant
TRAINER_TESTS = ["tests/training/test_loop.py", "tests/training/test_metrics.py"]
QLORA_TESTS = "tests/training/test_qlora.py::"
SINGLE_LOAD = (  # strategy=single's meta-device load of model.path
    "            self.load_report = load_into_meta_model(model, self.model_path, device=self._device, seed=self.seed)"
)
PLAN = "persimmon_train/training/memory_plan.py"
PLAN_TESTS = "tests/training/test_memory_plan.py::"
INPUT_TESTS = "tests/cli/test_input_errors.py"
DATA_KEY_TESTS = "tests/data/test_cache_key_and_splits.py"
PREEMPTION = "persimmon_train/training/preemption.py"
PREF_MODEL = "persimmon_train/model/preference.py"
PREF_OBJ = "persimmon_train/training/preference.py"
PREF_DATA = "persimmon_train/data/preference.py"
PREF_LOSS_TESTS = "tests/model/test_preference_loss.py"
PREF_OBJ_TESTS = "tests/training/test_preference_objective.py::"
PREF_DATA_TESTS = "tests/data/test_preference.py"
PREEMPT_UNIT_TESTS = "tests/training/test_preemption.py"
PREEMPT_RUN_TESTS = "tests/recipes/test_preemption.py"  # in-process single runs, ~25 s

MUTANTS = [
    # ------------------------------------------------------------------ model/loss.py
    Mutant(
        "loss.no_shift", LOSS, "return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)", "return labels", LOSS_TESTS
    ),
    Mutant("loss.shift_wrong_side", LOSS, "F.pad(labels[..., 1:], (0, 1)", "F.pad(labels[..., 1:], (1, 0)", LOSS_TESTS),
    Mutant(
        "loss.count_unshifted",
        LOSS,
        "return int((labels[..., 1:] != IGNORE_INDEX).sum())",
        "return int((labels != IGNORE_INDEX).sum())",
        LOSS_TESTS,
    ),
    Mutant("loss.keep_all_positions", LOSS, "if not bool(keep.all()):", "if False:", LOSS_TESTS),
    Mutant(
        "loss.first_chunk_only",
        LOSS,
        "for start in range(0, n, chunk_size):\n                h = hidden[start : start + chunk_size].to(dtype)\n"
        "                t = targets[start : start + chunk_size]\n                rows",
        "for start in range(0, min(n, chunk_size), chunk_size):\n"
        "                h = hidden[start : start + chunk_size].to(dtype)\n"
        "                t = targets[start : start + chunk_size]\n                rows",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.mean_over_all_positions",
        LOSS,
        "denominator = targets.shape[0] if num_items_in_batch is None else num_items_in_batch",
        "denominator = labels.numel() if num_items_in_batch is None else num_items_in_batch",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.ignore_num_items_in_batch",
        LOSS,
        "denominator = targets.shape[0] if num_items_in_batch is None else num_items_in_batch",
        "denominator = targets.shape[0]",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.grad_without_one_hot",
        LOSS,
        "grad_logits[rows, t] -= scale",
        "grad_logits[rows, t] -= 0 * scale",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.no_weight_grad",
        LOSS,
        "grad_weight.addmm_(grad_logits.t(), h)\n        ctx.weight_dtype",
        "grad_weight.zero_()\n        ctx.weight_dtype",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.hidden_grad_halved",
        LOSS,
        "grad_hidden[start : start + chunk_size] = grad_logits @ w  #",
        "grad_hidden[start : start + chunk_size] = 0.5 * grad_logits @ w  #",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.backward_ignores_incoming_grad",
        LOSS,
        "grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)",
        "grad_hidden = grad_hidden * 1.0",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.all_ignored_not_connected",
        LOSS,
        "return hidden.sum().float() * 0.0",
        "return torch.zeros((), device=hidden.device)",
        LOSS_TESTS,
    ),
    Mutant(
        "loss.matmul_ignores_autocast",
        LOSS,
        "return torch.get_autocast_dtype(device_type)",
        "return torch.promote_types(hidden.dtype, weight.dtype)",
        LOSS_TESTS,
        equivalent="under bf16 autocast the head would run in float32: slower and bigger, never less "
        "accurate, so no value a test compares changes (a speed/memory matter: bench/)",
    ),
    Mutant(
        "loss.chunk_not_capped_by_bytes",
        LOSS,
        "chunk = max(1, min(chunk_size, LOGITS_CHUNK_BYTES // (4 * vocab)))",
        "chunk = chunk_size",
        LOSS_TESTS,
    ),
    # ------------------------------------------------------------------ data/packing.py
    Mutant(
        "packing.not_decreasing",
        PACKING,
        'order = np.argsort(-lengths, kind="stable")',
        "order = np.arange(len(lengths))",
        PACKING_TESTS,
    ),
    Mutant(
        "packing.worst_fit",
        PACKING,
        "k = bisect.bisect_left(free_values, n)",
        "k = len(free_values) - 1 if free_values and free_values[-1] >= n else len(free_values)",
        PACKING_TESTS,
    ),
    Mutant("packing.new_row_always", PACKING, "if k == len(free_values):", "if True:", PACKING_TESTS),
    Mutant(
        "packing.no_first_label_mask",
        PACKING,
        "            out_labels[r, col] = IGNORE  # a document",
        "            pass  # a document",
        PACKING_TESTS,
    ),
    Mutant(
        "packing.positions_do_not_restart",
        PACKING,
        "out_pos[r, col : col + n] = ar[:n]",
        "out_pos[r, col : col + n] = ar[col : col + n]",
        PACKING_TESTS,
    ),
    Mutant(
        "packing.padding_positions_zero",
        PACKING,
        "out_pos[r, col:] = ar[: seq_len - col]",
        "out_pos[r, col:] = 0",
        PACKING_TESTS,
    ),
    Mutant(
        "packing.padding_not_counted",
        PACKING,
        "stats.padding_tokens += seq_len - col",
        "stats.padding_tokens += 0",
        PACKING_TESTS,
    ),
    Mutant(
        "packing.dropped_tokens_miscounted",
        PACKING,
        "stats.dropped_tokens += int(lengths[long].sum())",
        "stats.dropped_tokens += int(long.sum())",
        PACKING_TESTS,
    ),
    Mutant("packing.split_overlaps", PACKING, "start = k * seq_len", "start = k * (seq_len - 1)", PACKING_TESTS),
    Mutant("packing.long_docs_always_split", PACKING, 'if long_docs == "drop":', "if False:", PACKING_TESTS),
    Mutant(
        "packing.keep_full_rows_open",
        PACKING,
        "        if free > 0:\n",
        "        if free >= 0:\n",
        PACKING_TESTS,
        equivalent="a full row lands in the free-space-0 bucket, which bisect_left(free_values, n) never "
        "returns for a document of n >= 1 tokens: the rows are the same",
    ),
    # ------------------------------------------------------------------ training/trainer.py
    Mutant(
        "trainer.count_items_unshifted",
        TASKS,
        'return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())',
        'return int((batch["labels"] != IGNORE_INDEX).sum())',
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.filler_rows_counted",
        TASKS,
        "return _labelled_tokens(batch) if labels.dtype == torch.long else int(labels.shape[0])",
        "return int(labels.shape[0])",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.per_micro_batch_mean",
        TRAINER,
        "num_items_in_batch=global_items).loss",
        "num_items_in_batch=None).loss",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.classification_rows_not_reweighted",
        TRAINER,
        "return out.loss * (count_items(batch, self.task) / global_items)",
        "return out.loss",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.reported_loss_last_micro_batch",
        TRAINER,
        "loss_sum += loss.detach().float()",
        "loss_sum = loss.detach().float()",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.no_zero_grad",
        TRAINER,
        "        strategy.zero_grad()\n        self.scheduler.step()",
        "        self.scheduler.step()",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.no_scheduler_step",
        TRAINER,
        "        strategy.zero_grad()\n        self.scheduler.step()",
        "        strategy.zero_grad()",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.nonfinite_counter_not_reset",
        TRAINER,
        "        if finite:\n            self.state.consecutive_nonfinite = 0\n        else:",
        "        if finite:\n            pass\n        else:",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.eval_not_gathered",
        TRAINER,
        "if self.strategy.world_size > 1 and task.collect is not None:",
        "if False:",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.eval_loss_not_reduced",
        TRAINER,
        "totals = self.strategy.reduce_sum(",
        "totals = (lambda t: t)(",
        TRAINER_TESTS,
    ),
    Mutant(
        "trainer.multi_label_threshold_inclusive",
        TASKS,
        "preds.extend((logits > 0).int().tolist())",
        "preds.extend((logits >= 0).int().tolist())",
        TRAINER_TESTS,
        equivalent="a logit of exactly 0.0 has probability zero for a trained float model",
    ),
    Mutant(
        "trainer.checkpoint_while_nonfinite",
        TRAINER,
        "if every and state.step % every == 0 and state.consecutive_nonfinite == 0:",
        "if every and state.step % every == 0:",
        TRAINER_TESTS,
    ),
    # ------------------------------------------------------------------ features: generation, metrics, model
    Mutant(
        "features.sampling_is_greedy",
        "persimmon_train/model/decoding.py",
        "if do_sample:",
        "if False:",
        [
            "tests/model/test_parity.py::test_sampling_is_seeded_and_respects_top_k",
            "tests/model/test_parity.py::test_temperature_shapes_the_sampled_distribution",
            "tests/export/test_generate.py::test_generate_sampling_is_seeded_and_errors_are_one_line",
        ],
    ),
    Mutant(
        "features.temperature_ignored",
        "persimmon_train/model/decoding.py",
        "logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)",
        "logits = filter_logits(logits, top_k, top_p)",
        [
            "tests/model/test_parity.py::test_temperature_shapes_the_sampled_distribution",
            "tests/export/test_generate.py::test_generate_sampling_is_seeded_and_errors_are_one_line",
        ],
    ),
    Mutant(
        "features.top_k_ignored",
        "persimmon_train/model/decoding.py",
        "if top_k and top_k < logits.shape[-1]:",
        "if False:",
        [
            "tests/model/test_parity.py::test_top_k_never_samples_outside_the_k_best",
            "tests/model/test_parity.py::test_sampling_is_seeded_and_respects_top_k",
            "tests/export/test_generate.py::test_generate_sampling_is_seeded_and_errors_are_one_line",
        ],
    ),
    Mutant(
        "features.top_p_ignored",
        "persimmon_train/model/decoding.py",
        "if top_p < 1.0:",
        "if False:",
        [
            "tests/model/test_parity.py::test_top_p_never_samples_outside_the_nucleus",
            "tests/export/test_generate.py::test_generate_sampling_is_seeded_and_errors_are_one_line",
        ],
    ),
    Mutant(
        "features.cosine_is_linear",
        "persimmon_train/training/optim.py",
        "shape = 0.5 * (1.0 + math.cos(math.pi * progress))",
        "shape = 1.0 - progress",
        ["tests/training/test_optim_metrics.py"],
    ),
    Mutant(
        "features.linear_is_cosine",
        "persimmon_train/training/optim.py",
        "shape = 1.0 - progress",
        "shape = 0.5 * (1.0 + math.cos(math.pi * progress))",
        ["tests/training/test_optim_metrics.py"],
    ),
    Mutant(
        "features.clipping_off",
        "persimmon_train/parallel/single.py",
        "return torch.nn.utils.clip_grad_norm_(params, max_norm)",
        "return torch.nn.utils.get_total_norm([p.grad for p in params])",
        ["tests/training/test_loop.py::test_gradient_clipping_bounds_the_update_and_reports_the_unclipped_norm"],
    ),
    Mutant(
        "features.stream_drops_every_10th_document",
        "persimmon_train/data/streaming.py",
        "        for doc_ids, doc_labels in self.documents():\n",
        "        for doc_ids, doc_labels in (d for i, d in enumerate(self.documents()) if i % 10 != 9):\n",
        ["tests/data/test_sources.py::test_streaming_matches_in_memory_documents"],
    ),
    Mutant(
        "features.multi_label_f1_over_both_classes",
        "persimmon_train/training/metrics.py",
        "        scores.append(_f1(tp, fp, fn))\n    return sum(scores) / len(scores)\n\n\ndef mean_squared_error",
        "        tn = len(labels) - tp - fp - fn\n        scores.append((_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2)\n"
        "    return sum(scores) / len(scores)\n\n\ndef mean_squared_error",
        ["tests/training/test_metrics.py"],
    ),
    Mutant(
        "features.mse_is_mae",
        "persimmon_train/training/metrics.py",
        "return sum((p - t) ** 2 for p, t",
        "return sum(abs(p - t) for p, t",
        ["tests/training/test_metrics.py"],
    ),
    Mutant(
        "features.param_count_missing_bias",
        "persimmon_train/model/config.py",
        "mlp = h * i + i + i * h + h",
        "mlp = h * i + i * h + h",
        ["tests/model/test_config.py::test_8b_builds_on_meta_and_reports_parameter_count"],
    ),
    Mutant(
        "features.dense_without_bias",
        "persimmon_train/model/decoder.py",
        "self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)",
        "self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)",
        ["tests/model/test_config.py::test_8b_builds_on_meta_and_reports_parameter_count"],
    ),
    Mutant(
        "features.sharded_load_holds_full_tensors",
        "persimmon_train/parallel/sharded_load.py",
        "_read_rows(raw, entry.begin, dtype, shape, index[0] if index else slice(0, 1), local)",
        'globals().setdefault("_FULL", []).append(handle.get_tensor(source)); '
        'local.copy_(globals()["_FULL"][-1][index])',
        ["tests/distributed/test_meta_sharding.py::test_sharded_load_keeps_each_rank_near_its_share"],
    ),
    # DeepSpeed resume at another world size / stage: the resharding and its reader.
    Mutant(
        "features.reshard_lr_not_restored",
        RESHARD,
        "        group.update(hyper)\n",
        "        pass\n",
        [RESHARD_TESTS + "test_zero2_checkpoint_from_2_ranks_resumes_on_1_rank_under_zero3"],
    ),
    Mutant(
        "features.fsdp_lora_resume_strict",
        "persimmon_train/parallel/fsdp.py",
        "options=self._options(strict=False),",
        "options=self._options(),",
        [RESHARD_TESTS + "test_fsdp_lora_checkpoint_resumes_on_2_ranks"],
    ),
    Mutant(
        "features.frozen_base_kept_float32",
        "persimmon_train/parallel/single.py",
        "        hold_frozen_for(model, self.precision)\n",
        "",
        ["tests/training/test_frozen_weights.py"],
    ),
    Mutant(
        "features.bf16_embedding_not_upcast",
        "persimmon_train/model/decoder.py",
        "            hidden = hidden.float()\n",
        "            pass\n",
        ["tests/training/test_frozen_weights.py"],
    ),
    Mutant(
        "features.fsdp_frozen_shards_float32",
        "persimmon_train/parallel/fsdp.py",
        "        hold_frozen_for(model, self.precision)  # before sharding",
        "        0  # before sharding",
        ["tests/distributed/test_frozen_weights_fsdp.py"],
    ),
    Mutant(
        "features.reshard_step_count_reset",
        RESHARD,
        'state["step"] = step.clone()',
        'state["step"] = 0 * step.clone()',
        [RESHARD_TESTS + "test_zero2_checkpoint_from_2_ranks_resumes_on_1_rank_under_zero3"],
    ),
    Mutant(
        "features.reshard_moments_not_set",
        RESHARD,
        "            safe_set_full_optimizer_state(param, checkpoint.full(name, key), key)",
        "            pass",
        [RESHARD_TESTS + "test_zero2_checkpoint_from_2_ranks_resumes_on_1_rank_under_zero3"],
    ),
    Mutant(
        "features.reshard_zero3_model_copy_stale",
        RESHARD,
        "                    param.data.copy_(master.to(param.dtype))",
        "                    pass",
        [RESHARD_TESTS + "test_zero2_checkpoint_from_2_ranks_resumes_on_1_rank_under_zero3"],
    ),
    Mutant(
        "features.reshard_zero12_model_copy_stale",
        RESHARD,
        "            with torch.no_grad():\n                param.data.copy_(master.to(param.dtype))",
        "            pass",
        [RESHARD_TESTS + "test_zero2_bf16_checkpoint_from_2_ranks_resumes_on_1_rank"],
    ),
    Mutant(
        "features.zero_fragments_out_of_rank_order",
        "persimmon_train/storage/zero_checkpoint.py",
        "pieces.append(rank_flats[g].narrow(0, fragment.start, fragment.numel))",
        "pieces.insert(0, rank_flats[g].narrow(0, fragment.start, fragment.numel))",
        [RESHARD_TESTS + "test_zero_checkpoint_reader_equals_deepspeeds_zero_to_fp32"],
    ),
    Mutant(
        "features.zero_moments_read_from_exp_avg",
        "persimmon_train/storage/zero_checkpoint.py",
        "flats = [base[g].get(key) for g in sorted(base)]",
        'flats = [base[g].get("exp_avg") for g in sorted(base)]',
        [RESHARD_TESTS + "test_zero_checkpoint_moments_equal_single_process_adamw"],
    ),
    Mutant(
        "features.zero_bf16_partitions_not_found",
        "persimmon_train/storage/zero_checkpoint.py",
        '"*zero_pp_rank_*_mp_rank_00_optim_states.pt"',
        '"zero_pp_rank_*_mp_rank_00_optim_states.pt"',
        [RESHARD_TESTS + "test_zero2_bf16_checkpoint_from_2_ranks_resumes_on_1_rank"],
    ),
    Mutant(
        "features.deepspeed_shm_workspace_kept",
        "persimmon_train/parallel/deepspeed.py",
        "        self._unlink_shm_workspace()\n",
        "        pass\n",
        ["tests/distributed/test_deepspeed_shm.py"],
    ),
    # ------------------------------------------------------------------ inputs and unpinned behaviours
    Mutant(
        "inputs.num_threads_unchecked",
        "persimmon_train/training/config.py",
        "if t.num_threads is not None and t.num_threads < 1:",
        "if False:",
        [INPUT_TESTS],
    ),
    Mutant(
        "inputs.negative_grad_clip_accepted",
        "persimmon_train/training/config.py",
        "if o.grad_clip is not None and not o.grad_clip >= 0:",
        "if False:",
        [INPUT_TESTS],
    ),
    Mutant(
        "inputs.cuda_without_gpu_accepted",
        "persimmon_train/parallel/base.py",
        "    if count == 0:\n",
        "    if False:\n",
        [INPUT_TESTS],
    ),
    Mutant(
        "inputs.unused_peft_key_accepted",
        "persimmon_train/cli.py",
        '    if cfg.peft.method != "none":\n        return\n',
        "    return\n",
        [INPUT_TESTS],
    ),
    Mutant(
        "inputs.hydra_keys_accepted",
        "persimmon_train/cli.py",
        "    _reject_hydra_keys(overrides)\n    cfg = compose_config(",
        "    cfg = compose_config(",
        [INPUT_TESTS],
    ),
    Mutant(
        "inputs.every_rank_prints",
        "persimmon_train/cli.py",
        "if (rank == 0 or not (every_rank_sees_it or error_file)) and not restarted:",
        "if True:",
        [INPUT_TESTS + "::test_other_ranks_stay_silent_on_config_errors_and_tell_torchrun"],
    ),
    Mutant(
        "inputs.stream_resume_replays_epoch_0",
        "persimmon_train/data/loader.py",
        'self.epoch, self.batch = int(sd["epoch"]), int(sd["batch"])',
        'self.epoch, self.batch = 0, int(sd["batch"])',
        ["tests/data/test_streaming_loader.py"],
    ),
    Mutant(
        "inputs.stream_ranks_overlap",
        "persimmon_train/data/loader.py",
        "yield self._make_batch(rows[self.rank * self.micro : (self.rank + 1) * self.micro])",
        "yield self._make_batch(rows[: self.micro])",
        ["tests/data/test_streaming_loader.py"],
    ),
    Mutant(
        "inputs.stream_resume_unchecked",
        "persimmon_train/data/loader.py",
        "        check_same_order(sd, **self._order_settings())\n",
        "",
        ["tests/data/test_streaming_loader.py"],
    ),
    Mutant(
        "inputs.sharded_load_shape_unchecked",
        "persimmon_train/parallel/sharded_load.py",
        "if tuple(entry.shape) != tuple(param.shape):",
        "if False:",
        ["tests/distributed/test_sharded_load_checks.py"],
    ),
    Mutant(
        "inputs.split_seed_not_in_cache_key",
        "persimmon_train/data/config.py",
        '_NOT_IN_CACHE_KEY = {"num_proc",',
        '_NOT_IN_CACHE_KEY = {"split_seed", "num_proc",',
        [DATA_KEY_TESTS],
    ),
    Mutant(
        "inputs.eval_split_hashes_the_folder",
        "persimmon_train/data/formats.py",
        'self.split_name = source.name.rsplit("/", 1)[-1]',
        "self.split_name = source.name",
        [DATA_KEY_TESTS],
    ),
    Mutant(
        "inputs.labels_in_set_order",
        "persimmon_train/data/prepare_classification.py",
        "self.names = sorted(seen_names) if",
        "self.names = list(seen_names) if",
        [DATA_KEY_TESTS],
    ),
    Mutant(
        "inputs.tags_in_set_order",
        "persimmon_train/data/prepare_token_classification.py",
        "if ids else sorted(names)",
        "if ids else list(names)",
        [DATA_KEY_TESTS],
    ),
    Mutant(
        "inputs.cached_run_opens_the_file",
        "persimmon_train/data/sources.py",
        "    if streaming:\n        source.dataset",
        "    if True:\n        source.dataset",
        [DATA_KEY_TESTS],
    ),
    Mutant(
        "inputs.process_exit_walks_the_heap",
        "persimmon_train/recipes/main.py",
        "    atexit.unregister(gc.freeze)\n    atexit.register(gc.freeze)\n",
        "    atexit.unregister(gc.freeze)\n",
        ["tests/cli/test_command.py::test_the_command_freezes_the_collector_when_its_process_ends"],
    ),
    Mutant(
        "inputs.lora_merged_in_bf16",
        "persimmon_train/export/merge.py",
        "return merge_lora_weight(materialize(base.float()), lora.a[name]",
        "return merge_lora_weight(materialize(base), lora.a[name]",
        ["tests/export/test_bf16_base_merge.py"],
    ),
    Mutant(
        "inputs.fsdp_reduces_in_bf16",
        "persimmon_train/parallel/fsdp.py",
        "MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)",
        "MixedPrecisionPolicy(param_dtype=torch.bfloat16)",
        ["tests/distributed/test_fsdp_precision_policy.py"],
    ),
    Mutant(
        "inputs.sweep_summary_first_eval",
        "persimmon_train/recipes/sweep.py",
        "                if evals:\n                    metrics = evals",
        "                if evals and not metrics:\n                    metrics = evals",
        ["tests/cli/test_multirun.py::test_summary_reports_each_jobs_final_eval_not_its_first"],
    ),
    Mutant(
        "inputs.tokenizer_equal_to_vocab_refused",
        "persimmon_train/training/preflight.py",
        "if tokenizer.vocab_size > model_vocab:",
        "if tokenizer.vocab_size >= model_vocab:",
        ["tests/cli/test_preflight.py::test_tokenizer_as_large_as_the_vocabulary_is_accepted_one_piece_more_is_not"],
    ),
    Mutant(
        "inputs.tokenizer_command_exits_1",
        "persimmon_train/data/train_tokenizer.py",
        "        return EXIT_USER_ERROR",
        "        return 1",
        ["tests/data/test_tokenizer.py::test_train_tokenizer_command_reports_a_missing_file_in_one_line"],
    ),
    # ------------------------------------------------------------------ preemption and restarts
    Mutant(
        "preempt.flag_never_polled",
        TRAINER,
        "state.step < t.max_steps and self._stop_requested():",
        "state.step < t.max_steps and False:",
        [PREEMPT_RUN_TESTS],
    ),
    Mutant(
        "preempt.votes_not_reduced",
        PREEMPTION,
        "return agreed_reason(comm.reduce_sum(votes))",
        "return agreed_reason(votes)",
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.every_rank_clock_votes",
        PREEMPTION,
        "1.0 if self.is_main and self.over_budget()",
        "1.0 if self.over_budget()",
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.second_sigint_waits",
        PREEMPTION,
        'if name == "SIGINT" and self.received is not None:',
        "if False:",
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.no_checkpoint_on_stop",
        TRAINER,
        '!= f"step_{state.step}":\n            self.save(wait=True)\n        state.stopped_early = reason',
        '!= f"step_{state.step}":\n            pass\n        state.stopped_early = reason',
        [PREEMPT_RUN_TESTS],
    ),
    Mutant(
        "preempt.stopped_run_exported",
        "persimmon_train/training/run.py",
        "    if state.stopped_early:  # not finished",
        "    if False:  # not finished",
        [PREEMPT_RUN_TESTS],
    ),
    Mutant(
        "preempt.resume_auto_not_accepted",
        "persimmon_train/storage/checkpoints.py",
        'if resume in ("latest", "auto"):',
        'if resume == "latest":',
        [PREEMPT_RUN_TESTS],
    ),
    Mutant(
        "preempt.restart_loop_unbounded",
        PREEMPTION,
        "if count > limit:",
        "if False:",
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.torchrun_restart_trains_on",
        PREEMPTION,
        'and ended.get("torchelastic_run_id") == run_id:',
        "and False:",
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.exit_code_1",
        "persimmon_train/errors.py",
        "    exit_code = 3",
        "    exit_code = 1",
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.torchrun_no_restarts",
        "launch/torchrun.sh",
        'RESTARTS=(--max-restarts "$MAX_RESTARTS"',
        "RESTARTS=(--max-restarts 0",
        ["tests/distributed/test_launch_scripts.py"],
    ),
    Mutant(
        "preempt.resume_auto_not_added",
        "launch/common.sh",
        'if [[ "$has_output_dir" == 1 ]]; then ARGS+=(resume=auto); fi',
        ":",
        ["tests/distributed/test_launch_scripts.py"],
    ),
    Mutant(
        "preempt.restarted_error_printed_again",
        "persimmon_train/cli.py",
        "(every_rank_sees_it or error_file)) and not restarted:",
        "(every_rank_sees_it or error_file)):",
        ["tests/distributed/test_launch_errors.py"],
    ),
    Mutant(
        "preempt.ended_attempts_counted",
        PREEMPTION,
        'failed_before = record.get("start_step") == start_step and not ended',
        'failed_before = record.get("start_step") == start_step',
        [PREEMPT_UNIT_TESTS],
    ),
    Mutant(
        "preempt.async_written_on_training_thread",
        "persimmon_train/training/checkpointing.py",
        "        self.thread.start()",
        "        run()",
        ["tests/recipes/test_async_checkpoint.py"],
    ),
    Mutant(
        "preempt.async_not_staged",
        "persimmon_train/parallel/fsdp.py",
        "            return stager.stage(self._state())",
        "            return self._state()",
        ["tests/recipes/test_async_checkpoint.py"],
    ),
    Mutant(
        "preempt.async_allowed_for_deepspeed",
        "persimmon_train/training/config.py",
        'if cfg.checkpoint.async_save and s.name != "fsdp":',
        "if False:",
        ["tests/recipes/test_async_checkpoint.py::test_deepspeed_async_is_refused_in_one_line"],
    ),
    Mutant(
        "persist.zero_checkpoint_unpickled_with_full_trust",
        "persimmon_train/storage/zero_checkpoint.py",
        "mmap=mmap, weights_only=True)",
        "mmap=mmap, weights_only=False)",
        ["tests/storage/test_zero_checkpoint.py"],
    ),
    Mutant(
        "persist.deepspeed_resume_trusts_every_pickle",
        "persimmon_train/parallel/deepspeed.py",
        "        check_pickled_types(os.path.join(directory, TAG))",
        "        pass  # check_pickled_types(os.path.join(directory, TAG))",
        ["tests/storage/test_zero_checkpoint.py"],
    ),
    Mutant(
        "persist.stored_tensor_block_not_cast",
        "persimmon_train/storage/safetensors_io.py",
        "                yield read_tensor(handle, block, self.name).to(self.dtype)",
        "                yield read_tensor(handle, block, self.name)",
        ["tests/storage/test_streamed_writes.py"],
    ),
    Mutant(
        "persist.stored_tensor_read_whole",
        "persimmon_train/storage/safetensors_io.py",
        "        step = max(1, max_bytes // max(row_bytes, 1))",
        "        step = max(1, rows)",
        ["tests/storage/test_streamed_writes.py"],
    ),
    Mutant(
        "persist.shard_header_overflow_ignored",
        "persimmon_train/storage/safetensors_io.py",
        "current.size + size > self.limit or not current.fits(name, tensor.dtype, tensor.shape, size)",
        "current.size + size > self.limit",
        ["tests/storage/test_streamed_writes.py"],
    ),
    Mutant(
        "planner.cpu_heap_keeps_freed_tensors",
        "persimmon_train/training/run.py",
        "        safetensors_io.map_large_blocks()\n",
        "        pass\n",
        ["tests/training/test_frozen_weights.py::test_a_cpu_process_maps_large_blocks_before_it_builds_anything"],
    ),
    Mutant(
        "dpo.fused_logps_softmax_sign",
        LOSS,
        ".exp_().mul_(-g[:, None])",
        ".exp_().mul_(g[:, None])",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.fused_logps_no_target_term",
        LOSS,
        "grad_logits[torch.arange(t.shape[0], device=t.device), t] += g",
        "pass",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.fused_logps_last_chunk_only",
        LOSS,
        "out[start : start + chunk_size] = logits[torch.arange(t.shape[0], device=t.device), t] - lse",
        "out[start:] = logits[torch.arange(t.shape[0], device=t.device), t][0] - lse[0]",
        [PREF_LOSS_TESTS, "tests/model/test_loss.py"],
    ),
    Mutant(
        "preempt.restarted_group_shares_store_keys",
        "persimmon_train/parallel/distributed.py",
        "f\"persimmon_train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}\"",
        '"persimmon_train/attempt"',
        ["tests/distributed/test_attempt_store.py"],
    ),
    Mutant(
        "features.recipe_env_not_pinned",
        "tests/helpers.py",
        'env["PYTHONPATH"] = os.pathsep.join(',
        'env["_UNPINNED"] = os.pathsep.join(',
        ["tests/recipes/test_import_path.py"],
    ),
    # ------------------------------------------------------------------ a user's run survives
    Mutant(
        "persist.rerun_not_refused",
        RUN_FOLDER,
        "    if checkpoints or files:\n        found",
        "    if False:\n        found",
        [RUN_FOLDER_TESTS, PERSISTENCE_TESTS + "test_rerun_into_a_finished_run_is_refused_and_changes_nothing"],
    ),
    Mutant(
        "persist.run_skips_the_folder_check",
        RUN,
        "    run_folder.agree(strategy, lambda: run_folder.check_start(cfg, output_dir))",
        "    pass",
        [RUN_FOLDER_TESTS + "::test_train_holds_the_lock_while_it_trains_and_releases_it"],
    ),
    Mutant(
        "persist.overwrite_with_resume_allowed",
        "persimmon_train/training/config.py",
        "    if cfg.overwrite and cfg.resume is not None:",
        "    if False:",
        [RUN_FOLDER_TESTS],
    ),
    Mutant(
        "persist.overwrite_keeps_old_checkpoints",
        RUN_FOLDER,
        "            shutil.rmtree(path)\n",
        "",
        [RUN_FOLDER_TESTS],
    ),
    Mutant(
        "persist.overwrite_removes_users_files",
        RUN_FOLDER,
        "if is_own_file(f) and os.path.isfile",
        "if os.path.isfile",
        [RUN_FOLDER_TESTS],
    ),
    Mutant(
        "persist.overwrite_not_applied_by_the_run",
        RUN,
        "overwrite=cfg.overwrite)",
        "overwrite=False)",
        [PERSISTENCE_TESTS + "test_overwrite_starts_over_and_keeps_files_that_are_not_the_runs"],
    ),
    Mutant(
        "persist.lock_not_taken",
        RUN_FOLDER,
        "            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)",
        [RUN_FOLDER_TESTS],
    ),
    Mutant(
        "persist.run_takes_no_lock",
        RUN,
        "    lock = run_folder.lock_run(output_dir, strategy, overwrite=cfg.overwrite)",
        "    lock = run_folder.RunLock()",
        [RUN_FOLDER_TESTS + "::test_train_holds_the_lock_while_it_trains_and_releases_it"],
    ),
    Mutant(
        "persist.lock_kept_after_the_export",
        "persimmon_train/recipes/train.py",
        "        result.release_lock()",
        "        pass",
        [PERSISTENCE_TESTS + "test_overwrite_starts_over_and_keeps_files_that_are_not_the_runs"],
    ),
    Mutant(
        "persist.ranks_decide_alone",
        RUN_FOLDER,
        "    kind, value = strategy.broadcast_object(outcome)",
        '    kind, value = outcome or ("ok", check())',
        [RUN_FOLDER_TESTS],
    ),
    Mutant(
        "persist.all_damaged_starts_fresh",
        CHECKPOINTS,
        "        if chosen is None and damaged:",
        "        if False:",
        [
            "tests/storage/test_checkpoints.py",
            PERSISTENCE_TESTS + "test_resume_latest_with_every_checkpoint_damaged_is_refused_and_changes_nothing",
        ],
    ),
    Mutant(
        "persist.torch_short_write_unnamed",
        "persimmon_train/storage/files.py",
        "    except RuntimeError as exc:\n        described",
        "    except ZeroDivisionError as exc:\n        described",
        ["tests/storage/test_checkpoints.py"],
    ),
    Mutant(
        "persist.full_disk_not_said",
        "persimmon_train/storage/files.py",
        "    if free is not None and free < FULL_DISK_BYTES:",
        "    if False:",
        ["tests/storage/test_checkpoints.py"],
    ),
    Mutant(
        "persist.steps_sorted_as_text",
        CHECKPOINTS,
        "    return sorted(found)",
        "    return sorted(found, key=lambda f: os.path.basename(f[1]))",
        [
            "tests/storage/test_checkpoints.py::test_step_order_is_numeric_for_resume_and_pruning",
            "tests/storage/test_checkpoints.py::test_keep_last_across_a_digit_boundary_keeps_the_newest",
            "tests/training/test_cli_and_trackers.py::test_wandb_summary_last_checkpoint_is_the_highest_step",
        ],
    ),
    # ------------------------------------------------------------------ QLoRA (peft.quantize_base=nf4)
    Mutant(
        "features.qlora_base_not_quantized",
        "persimmon_train/parallel/single.py",
        'if self.quantize_base == "nf4":  # NF4 placeholders',
        "if False:  # NF4 placeholders",
        [QLORA_TESTS + "test_loading_puts_each_frozen_decoder_matrix_in_nf4_one_tensor_at_a_time"],
    ),
    Mutant(
        "features.qlora_quantized_after_a_bf16_load",
        "persimmon_train/parallel/single.py",
        "                quantize_frozen_linears(model)\n" + SINGLE_LOAD,
        "                pass\n" + SINGLE_LOAD + "\n            if self.quantize_base == 'nf4':\n"
        "                quantize_frozen_linears(model)",
        [QLORA_TESTS + "test_loading_puts_each_frozen_decoder_matrix_in_nf4_one_tensor_at_a_time"],
    ),
    Mutant(
        "features.qlora_fp32_accepted",
        "persimmon_train/parallel/nf4.py",
        'if quantize_base == "nf4" and precision != "bf16":',
        "if False:",
        [QLORA_TESTS + "test_nf4_refuses_a_float32_run_after_resolving_auto"],
    ),
    Mutant(
        "features.qlora_deepspeed_accepted",
        "persimmon_train/training/config.py",
        'if p.quantize_base != "none" and cfg.strategy.name == "deepspeed":',
        "if False:",
        [QLORA_TESTS + "test_quantize_base_refusals_in_the_config"],
    ),
    Mutant(
        "features.qlora_resume_ignores_base",
        "persimmon_train/training/checkpointing.py",
        'if saved_quant != mine_peft["quantize_base"]:',
        "if False:",
        [QLORA_TESTS + "test_qlora_resume_refuses_another_base_precision"],
    ),
    Mutant(
        "features.qlora_nan_not_checked",
        "persimmon_train/parallel/sharded_load.py",
        "                            if has_nonfinite(full):",
        "                            if False:",
        [QLORA_TESTS + "test_a_nan_in_a_matrix_bound_for_nf4_is_refused_naming_it"],
    ),
    Mutant(
        "features.qlora_quantizes_outside_the_decoder",
        "persimmon_train/parallel/nf4.py",
        "if id(m) in inside and isinstance(m, nn.Linear)",
        "if isinstance(m, nn.Linear)",
        [QLORA_TESTS + "test_loading_puts_each_frozen_decoder_matrix_in_nf4_one_tensor_at_a_time"],
    ),
    Mutant(
        "features.qlora_fsdp_rank_keeps_first_rows",
        "persimmon_train/parallel/nf4.py",
        "chunk = quantized.split(count, dim=0)[rows.start // count]",
        "chunk = quantized.split(count, dim=0)[0]",
        ["tests/distributed/test_qlora_fsdp.py::test_fsdp2_qlora_trains_and_matches_one_process"],
    ),
    Mutant(
        "planner.frozen_held_float32",
        PLAN,
        'frozen_matrix = ("bf16", 2) if precision == "bf16" else ("float32", 4)',
        'frozen_matrix = ("float32", 4)',
        [PLAN_TESTS + "test_8b_lora_bf16_weights_are_bf16_matrices_float32_vectors_and_float32_adapters"],
    ),
    Mutant(
        "planner.adapters_half_counted",
        PLAN,
        "adapters = peft.r * (fan_in + fan_out)",
        "adapters = peft.r * fan_out",
        [PLAN_TESTS + "test_parameter_counts_match_the_model_with_peft_lora"],
    ),
    Mutant(
        "planner.fsdp_not_sharded",
        PLAN,
        "shard = max(1, world // max(1, cfg.strategy.replicate_degree))",
        "shard = 1",
        [PLAN_TESTS + "test_fsdp_divides_by_the_shard_group_and_zero_by_its_stage"],
    ),
    Mutant(
        "planner.zero2_gradients_whole",
        PLAN,
        "        if stage >= 2:\n            grads = math.ceil(grads / world)",
        "        if stage >= 3:\n            grads = math.ceil(grads / world)",
        [PLAN_TESTS + "test_fsdp_divides_by_the_shard_group_and_zero_by_its_stage"],
    ),
    Mutant(
        "planner.checkpointing_ignored",
        PLAN,
        "checkpointed = 0 if k <= 0 else math.ceil(n / k)",
        "checkpointed = 0",
        [PLAN_TESTS + "test_activations_follow_activation_checkpointing_by_hand"],
    ),
    Mutant(
        "planner.logits_chunk_uncapped",
        PLAN,
        "chunk = max(1, min(1024, LOGITS_CHUNK_BYTES // (4 * v), tokens))",
        "chunk = max(1, min(1024, tokens))",
        [PLAN_TESTS + "test_the_logits_chunk_is_the_loss_files_chunk"],
    ),
    Mutant(
        "planner.never_refuses",
        PLAN,
        "need > available and",
        "need > available * 1000 and",
        [PLAN_TESTS + "test_a_run_that_cannot_fit_is_refused_naming_the_key"],
    ),
    Mutant(
        "planner.check_memory_ignored",
        PLAN,
        ' and getattr(cfg.trainer, "check_memory", True):',
        ":",
        [PLAN_TESTS + "test_a_run_that_cannot_fit_is_refused_naming_the_key"],
    ),
    Mutant(
        "planner.run_does_not_check",
        RUN,
        "    memory_plan.check_run(cfg, strategy)",
        "    pass",
        [PLAN_TESTS + "test_the_refusal_comes_before_data_and_model_and_leaves_no_output"],
    ),
    # -- preference tuning (issue 20): DPO / reward on packed pairs --------------------------------
    Mutant(
        "dpo.target_doc_unshifted",
        PREF_MODEL,
        "    target_doc = shift_labels(doc_ids)  # the document of the token a position predicts",
        "    target_doc = doc_ids",
        [PREF_LOSS_TESTS],
        equivalent="a position whose document differs from its target's predicts a document's first token, "
        "whose label is always -100 (data/preference.py), so `keep` drops it either way",
    ),
    Mutant(
        "dpo.labels_unshifted",
        PREF_MODEL,
        "    keep = (shift_labels(labels) != IGNORE_INDEX) & (target_doc >= 0)",
        "    keep = (labels != IGNORE_INDEX) & (target_doc >= 0)",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.ipo_margin_sign",
        PREF_MODEL,
        "        losses = (logits - 1 / (2 * beta)) ** 2",
        "        losses = (logits + 1 / (2 * beta)) ** 2",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.label_smoothing_ignored",
        PREF_MODEL,
        " - F.logsigmoid(-beta * logits) * label_smoothing",
        "",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.reference_ratio_dropped",
        PREF_MODEL,
        "    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)",
        "    logits = policy_chosen - policy_rejected",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.ipo_not_length_averaged",
        PREF_OBJ,
        '        if self.dpo.loss == "ipo":',
        "        if False:",
        [PREF_OBJ_TESTS + "test_dpo_loss_in_the_objective_counts_pairs_and_logs_trl_names"],
    ),
    Mutant(
        "dpo.reference_with_adapters_on",
        PREF_OBJ,
        "        with torch.no_grad(), _adapters_off(model), _eval_mode(model):",
        "        with torch.no_grad(), _eval_mode(model):",
        [PREF_OBJ_TESTS + "test_lora_reference_is_the_model_with_adapters_disabled"],
    ),
    Mutant(
        "dpo.stored_reference_ignored",
        PREF_OBJ,
        '        if self.reference == "stored":',
        '        if self.reference == "never":',
        [PREF_OBJ_TESTS + "test_stored_reference_equals_a_live_reference_model"],
    ),
    Mutant(
        "dpo.reward_pooled_at_pad",
        PREF_MODEL,
        "        real = real & (input_ids != pad_token_id)",
        "        pass",
        [PREF_OBJ_TESTS + "test_reward_scores_at_each_documents_last_token_equal_transformers"],
    ),
    Mutant(
        "dpo.pairs_split_across_rows",
        PREF_DATA,
        "    bins = best_fit_decreasing(np.array([len(c) + len(r) for c, r, _ in docs], dtype=np.int64), seq_len)",
        "    bins = [[i] for i in range(len(docs))]",
        [PREF_LOSS_TESTS + "::test_dpo_on_packed_rows_equals_transformers_by_hand"],
    ),
    Mutant(
        "dpo.prompt_labelled",
        PREF_DATA,
        "                labels[r, col + p : col + n] = doc[p:]  # the response (the prompt is >= 1 token)",
        "                labels[r, col + 1 : col + n] = doc[1:]",
        [PREF_LOSS_TESTS],
    ),
    Mutant(
        "dpo.long_pairs_not_truncated",
        PREF_DATA,
        "        prompt = prompt[len(prompt) - keep :]",
        "        prompt = prompt[:keep]",
        [PREF_DATA_TESTS],
    ),
    Mutant(
        "dpo.same_responses_accepted",
        PREF_DATA,
        "    if chosen == rejected:",
        "    if False:",
        [PREF_DATA_TESTS],
    ),
    Mutant(
        "dpo.keys_of_other_objectives_ignored",
        "persimmon_train/training/config.py",
        "        if cfg.objective != section and getattr(cfg, section) != defaults:",
        "        if False:",
        [PREF_OBJ_TESTS + "test_options_not_honoured_are_refused"],
    ),
]

GROUPS = {"loss": LOSS, "packing": PACKING, "trainer": TRAINER}  # "trainer" includes training/tasks.py


def copy_checkout(dest: Path, worktree: bool) -> None:
    """The committed tree (HEAD); with `worktree`, the files as they are now, uncommitted edits and
    untracked files git does not ignore included."""
    dest.mkdir(parents=True)
    if not worktree:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_pytest(
    root: Path,
    tests: list[str],
    extra: list[str],
    deselect: set[str],
    report: Path,
    timeout: float,
    stop_at_first: bool = True,
) -> tuple[int, float]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        *(["-x"] if stop_at_first else []),
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        *extra,
        *tests,
        *[a for d in sorted(deselect) for a in ("--deselect", d)],
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.perf_counter() - start


def failing_tests(report: Path) -> dict[str, str]:
    """{node id: first line of the failure message} of the failed/errored cases in a junit report."""
    if not report.exists():
        return {}
    failed = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            module = case.get("classname", "").replace(".", "/")
            message = (problem.get("message") or "").strip().splitlines()
            failed[f"{module}.py::{case.get('name')}"] = message[0][:160] if message else ""
    return failed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--group", choices=[*GROUPS, "features", "inputs", "persist", "preempt", "planner", "dpo"], action="append"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--tests", nargs="+", metavar="NODE", help="run these tests instead of each mutant's own")
    parser.add_argument(
        "--worktree",
        action="store_true",
        help="mutate the working tree's files as they are now (default: the committed HEAD)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    chosen = [
        m
        for m in MUTANTS
        if (not args.only or m.name in args.only) and (not args.group or m.name.split(".")[0] in args.group)
    ]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.path}  [{'equivalent' if m.equivalent else 'must be killed'}]")
        return 0
    if not chosen:
        print("no mutant matches", file=sys.stderr)
        return 2
    if args.tests:
        chosen = [Mutant(m.name, m.path, m.old, m.new, list(args.tests), m.equivalent, m.extra) for m in chosen]
    with tempfile.TemporaryDirectory(prefix="persimmon-mutants-") as tmp:
        root = Path(tmp) / "checkout"
        copy_checkout(root, args.worktree)
        # Baseline: the unmutated copy. Its failures are deselected below (not ours to judge here).
        every_test = sorted({t for m in chosen for t in m.tests})
        report = Path(tmp) / "baseline.xml"
        rc, seconds = run_pytest(root, every_test, [], set(), report, args.timeout * 2, stop_at_first=False)
        deselect = set(failing_tests(report)) if rc not in (0, 5) else set()
        print(f"baseline ({seconds:.0f}s): {len(deselect)} failing test(s) deselected {sorted(deselect)}", flush=True)
        results = []
        for m in chosen:
            target = root / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                results.append((m, "STALE", 0.0))  # the code moved on: update the mutant
                print(f"{m.name:45s} STALE (pattern found {original.count(m.old)} times in {m.path})", flush=True)
                continue
            target.write_text(original.replace(m.old, m.new))
            report = Path(tmp) / "mutant.xml"
            report.unlink(missing_ok=True)
            try:
                rc, seconds = run_pytest(root, m.tests, m.extra, deselect, report, args.timeout)
            finally:
                target.write_text(original)
            outcome = {0: "survived", 5: "NO TESTS", -1: "KILLED (timeout)"}.get(rc, "KILLED")
            results.append((m, outcome, seconds))
            note = f"  [equivalent: {m.equivalent}]" if m.equivalent and outcome == "survived" else ""
            if outcome == "KILLED":
                failed = failing_tests(report)
                note = "".join(f"\n      by {test}: {message}" for test, message in sorted(failed.items()))
                note = note or "  (collection error)"
            print(f"{m.name:45s} {outcome:10s} {seconds:6.1f}s{note}", flush=True)
    bad = [
        m.name
        for m, outcome, _ in results
        if (outcome == "survived" and not m.equivalent) or outcome in ("STALE", "NO TESTS")
    ]
    killed = sum(outcome.startswith("KILLED") for _, outcome, _ in results)
    print(
        f"\n{killed} killed, {len(results) - killed} not killed of {len(results)}; "
        f"unexpected survivors / stale: {bad or 'none'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
