"""The settings that make a run the run it is, as plain data (no torch import): `sweep.config.identity` hashes them
into run ids, and the analysis compares them to tell seeds of one setup from runs of different setups."""
from __future__ import annotations

from typing import Any

# The settings every run id has hashed since ids were introduced, in the order they are hashed. Never edit.
ID_SETTINGS_V1 = ("batch_size", "beta1", "beta2", "data_seed", "dataset", "eval_retrieval_samples",
                  "eval_zeroshot_samples", "finetune_lr", "finetune_samples", "grad_clip", "image_strategy",
                  "image_tokens", "lr", "model", "pretrain_samples", "seed", "spacy_model", "text_strategy",
                  "text_tokens", "train_scenes", "warmup_fraction", "weight_decay")
# Every scientific setting added after ID_SETTINGS_V1 -> the value that reproduces the behaviour from before it
# existed. A run id hashes such a setting only when its value differs from this one.
ADDED_SETTINGS: dict[str, Any] = {
    "train_data": None, "train_num_samples": None, "csv_img_key": "filepath", "csv_caption_key": "title",
    "csv_separator": "\t", "eval_embedded": True, "eval_sets": [], "eval_full_length": False,
    "min_crop_scale": 0.9,  # open_clip_train's (sweep.data.images.MIN_CROP_SCALE)
}
