"""Run the pruning defense: ``badnet-prune --drop 0.04``.

With the lab's files (models/bd_net.h5 or --model, data/cl/{valid,test}.h5, data/bd/bd_{valid,test}.h5 or the
four data flags) it runs on them; with none of them it runs on the embedded demo and says so.
"""

from __future__ import annotations

import jax
from absl import flags

from badnet_jax.commands import cli, processes
from badnet_jax.defense.pipeline import DefenseConfig, run_defense
from badnet_jax.defense.finetune import FinetuneConfig
from badnet_jax.sweep.anp import ANPConfig
from badnet_jax.sweep.rankings import RankingOptions
from badnet_jax.defense.report import comparison_text, format_table
from badnet_jax.defense.scale import CHOICES
from badnet_jax.sweep import SweepOptions
from badnet_jax.errors import ConfigError, arg

DROP = flags.DEFINE_string("drop", "0.04", "Accuracy drop(s) X as fractions, comma-separated (0.04 = 4 points).")
RULE = flags.DEFINE_enum("rule", "absolute", ["absolute", "relative"],
                         "absolute: X percentage points (the lab's rule); relative: X of the original accuracy.")
MODEL = flags.DEFINE_string("model", None, "Keras file of the BadNet: the lab's DeepID or any CNN of standard layers "
                            "(default models/bd_net.h5, models/bd_weights.h5).")
EXAMPLE = flags.DEFINE_enum("example", None, ["deepid", "gapnet"], "Run an embedded example instead of files: "
                            "deepid (the demo DeepID, also the default without files) or gapnet (a 32x32 "
                            "BatchNorm CNN with a global-average-pooling head).")
LAYER = flags.DEFINE_string("layer", None, "The layer whose output channels are pruned (default: pool_3 for the lab's "
                            "DeepID, else the last feature map before flatten or global pooling).")
CLEAN_VALID = flags.DEFINE_string("clean_valid", None, "Clean validation h5 (default data/cl/valid.h5).")
BD_VALID = flags.DEFINE_string("bd_valid", None, "Poisoned validation h5 (default data/bd/bd_valid.h5).")
CLEAN_TEST = flags.DEFINE_string("clean_test", None, "Clean test h5 (default data/cl/test.h5).")
BD_TEST = flags.DEFINE_string("bd_test", None, "Poisoned test h5 (default data/bd/bd_test.h5).")
SCALE = flags.DEFINE_enum("input_scale", "auto", list(CHOICES),
                          "Pixels as the model takes them: raw 0..255 (the lab's B), 255 = pixels / 255 (the "
                          "CSAW-HackML-2020 BadNets), auto = measure clean accuracy at both and take the clear winner.")
OUT_DIR = flags.DEFINE_string("out_dir", "results", "Output folder (replaced as a whole by the new results).")
CHUNK = flags.DEFINE_integer("chunk", None, "Images per chunk inside the jitted sweep (bounds memory; "
                             "default 256 on CPU, 4096 on GPU/TPU).")
FT_EPOCHS = flags.DEFINE_integer("finetune_epochs", 0, "Fine-pruning epochs per selected B' (0 = pruning only).",
                                 lower_bound=0)
FT_LR = flags.DEFINE_float("finetune_lr", 1e-4, "Fine-pruning learning rate (Adam).")
BUDGET = flags.DEFINE_float("memory_budget", None, "GiB the sweep may use (default: half the device's memory).")
DEVICES = flags.DEFINE_integer("devices", 0, "Devices to shard the images over (0 = all).")
PROGRESS = flags.DEFINE_bool("progress", None, "Show the sweep's progress on stderr (default: when stderr is a "
                             "terminal; in multi-process runs give the same value to every process).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: jax.distributed coordinator host:port.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")
DIST_TIMEOUT = flags.DEFINE_integer("distributed_timeout", processes.DISTRIBUTED_TIMEOUT_S, "Multi-host: seconds to wait to join, and to notice "
                                    "a process that died (the others then stop with an error).")
RANK_BY = flags.DEFINE_list("rank_by", ["activation"], "Pruning orders to compare, comma-separated: activation "
                            "(the lab's), clp, l1, random, anp, order_file. The first one's cuts are written.")
RANDOM_ORDERS = flags.DEFINE_integer("random_orders", 5, "How many seeded random orders 'random' sweeps.",
                                     lower_bound=1)
SEED = flags.DEFINE_integer("seed", 0, "Seed of the random orders and of ANP.")
ORDER_FILE = flags.DEFINE_string("order_file", None, "Your own pruning order: C channel indices (DeepID: 60) (JSON list, text, "
                                 "or a curve.json); adds the ranking 'order_file'.")
ANP_STEPS = flags.DEFINE_integer("anp_steps", ANPConfig.steps, "ANP optimiser steps (128 clean images each).",
                                 lower_bound=1)
CHECKPOINTS = flags.DEFINE_bool("checkpoints", True, "Write B' (orbax + Keras h5) and GoodNet checkpoints.")

# DefenseConfig's fields (dotted: nested configs) -> these flags, so errors name what the user typed.
FLAG_OF = {"drops": DROP.name, "rule": RULE.name, "model": MODEL.name, "layer": LAYER.name, "example": EXAMPLE.name, "clean_valid": CLEAN_VALID.name,
           "bd_valid": BD_VALID.name, "clean_test": CLEAN_TEST.name, "bd_test": BD_TEST.name,
           "input_scale": SCALE.name, "out_dir": OUT_DIR.name, "checkpoints": CHECKPOINTS.name,
           "chunk": CHUNK.name, "devices": DEVICES.name, "memory_budget": BUDGET.name,
           "rank_by": RANK_BY.name, "random_orders": RANDOM_ORDERS.name, "seed": SEED.name,
           "order_file": ORDER_FILE.name, "anp.steps": ANP_STEPS.name, "learning_rate": FT_LR.name, "progress": PROGRESS.name,
           "epochs": FT_EPOCHS.name, "finetune": FT_EPOCHS.name}


def main(argv: list[str]) -> int:
    cli.setup_logging()  # here, after absl has applied its own --verbosity

    def defend() -> int:
        started = cli.process_seconds()  # Python and the imports (JAX's ~2 s) come before any phase the run logs
        cli.refuse_extra_args(argv)
        if flags.FLAGS[FT_LR.name].present and FT_EPOCHS.value == 0:
            raise ConfigError(f"{arg('learning_rate', FT_LR.value)} needs {arg('epochs')} > 0: without it no "
                              "fine-tuning runs", field="learning_rate")
        budget = cli.memory_budget_bytes(BUDGET.value)  # GiB here, bytes in the library
        config = DefenseConfig(
            drops=cli.parse_floats("drop", DROP.value), rule=RULE.value, model=MODEL.value, layer=LAYER.value, example=EXAMPLE.value,
            clean_valid=CLEAN_VALID.value, bd_valid=BD_VALID.value, clean_test=CLEAN_TEST.value,
            bd_test=BD_TEST.value, out_dir=OUT_DIR.value, input_scale=SCALE.value, checkpoints=CHECKPOINTS.value,
            sweep=SweepOptions(chunk=CHUNK.value, devices=DEVICES.value, memory_budget=budget, progress=PROGRESS.value),
            finetune=FinetuneConfig(epochs=FT_EPOCHS.value, learning_rate=FT_LR.value) if FT_EPOCHS.value > 0 else None,
            rankings=RankingOptions(rank_by=tuple(RANK_BY.value), random_orders=RANDOM_ORDERS.value, seed=SEED.value,
                                    order_file=ORDER_FILE.value, anp=ANPConfig(steps=ANP_STEPS.value)))
        if COORDINATOR.value:
            processes.init_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value, DIST_TIMEOUT.value)
        else:
            processes.use_cpu_cores()  # the images sharded over the cores (--devices 0), one program per core
            processes.use_compile_cache()  # a later run of the same shapes loads its programs
        curve = run_defense(config)
        if jax.process_index() == 0:  # the others print nothing, as they write nothing
            if started is not None:
                cli.log.info("Done in %.2f s since the process started, of which %.2f s before the run: starting "
                             "Python (and any launcher that ran it) and importing JAX and the tool.",
                             cli.process_seconds(), started)
            print(format_table(curve))
            if curve.rankings is not None:
                print("\nRankings compared (each ranking's own cut):\n" + comparison_text(curve))
        return 0

    return cli.run(defend, "interrupted: --out_dir holds the earlier results or this run's, whole (the swap is "
                           "atomic), never a mix, and nothing half-written", flags=FLAG_OF)
