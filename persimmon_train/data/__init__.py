"""Data: sentencepiece tokenizer, sources, task formats, 16K packing, resumable sharded loaders."""

from persimmon_train.data.build import DataBundle, build_data, default_cache_dir
from persimmon_train.data.config import DataConfig
from persimmon_train.data.demo import DemoAssets, demo_assets
from persimmon_train.data.packing import PackStats, best_fit_decreasing, pack
from persimmon_train.data.tokenizer import Tokenizer

__all__ = [
    "Tokenizer",
    "DataConfig",
    "build_data",
    "DataBundle",
    "demo_assets",
    "DemoAssets",
    "pack",
    "best_fit_decreasing",
    "PackStats",
    "default_cache_dir",
]
