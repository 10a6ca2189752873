"""Fine-tunes straight into Hugging Face transformers, from base + delta, writing nothing.

:func:`from_pretrained` rebuilds the weights in memory and hands them to transformers'
own ``from_pretrained`` (as ``state_dict=``, with the fine-tune's config), so dtype
handling, weight tying and initialisation are transformers' own: the model is the one
``from_pretrained`` of the fine-tune's directory gives, output for output.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

from deltapack import _deltas, _native, _path, _tensors_of, safe_open
from deltapack.errors import BadInputError

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class _Rebuilt:
    """The tensors and files of a fine-tune rebuilt in memory."""

    def __init__(self, base, deltas, threads: Optional[int] = None) -> None:
        raw, self.files, _meta, _report = _native.load(_path(base), _deltas(deltas), None, threads)
        self.raw = raw

    def state_dict(self) -> dict:
        return _tensors_of(self.raw, "pt", "cpu")

    def json_file(self, name: str) -> Optional[dict]:
        data = self.files.get(name)
        return None if data is None else json.loads(data)


def _config(files: dict):
    """The fine-tune's config, from the ``config.json`` its delta carries.

    It is read in memory, as ``AutoConfig.from_pretrained`` reads it: by the config class
    its ``model_type`` names.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "config.json" not in files:
        raise BadInputError(
            "the delta carries no config.json: make it from a model directory that has one "
            "(or pass config= to from_pretrained)"
        )
    config_dict = json.loads(files["config.json"])
    model_type = config_dict.get("model_type")
    if model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type].from_dict(config_dict)
    # No known model type (a custom model): let AutoConfig say what it needs.
    return AutoConfig.for_model(model_type, **config_dict)


def _model_class(config):
    """The class the config's ``architectures`` names, else the AutoModel for its type."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _concrete(cls, config):
    """An Auto class resolved to the model class it picks for ``config``.

    ``AutoModel``, ``AutoModelForCausalLM``... load only from a name or directory, so they
    are resolved here, as their ``from_pretrained`` would.
    """
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, mapping)


def from_pretrained(base, deltas, cls=None, *, threads: Optional[int] = None, **kwargs: Any):
    """A transformers model with the fine-tune's weights and config, rebuilt in memory.

    ``cls`` defaults to the class the config's ``architectures`` names (``AutoModel``
    without one). ``kwargs`` go to ``cls.from_pretrained`` (``dtype``, ``device_map``,
    ...); ``config=`` overrides the config the delta carries. The result is the model
    ``cls.from_pretrained(finetuned_dir)`` gives, with its generation config where the
    delta carries one.
    """
    rebuilt = _Rebuilt(base, deltas, threads)
    config = kwargs.pop("config", None)
    if config is None:
        config = _config(rebuilt.files)
    cls = _concrete(_model_class(config) if cls is None else cls, config)
    model = cls.from_pretrained(None, config=config, state_dict=rebuilt.state_dict(), **kwargs)
    generation = rebuilt.json_file("generation_config.json")
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(generation)
    return model


def tokenizer(base, deltas, **kwargs: Any):
    """The fine-tune's tokenizer, from the tokenizer files its delta carries.

    transformers reads tokenizers from a directory only: the files are written to a
    temporary directory, loaded with ``AutoTokenizer.from_pretrained(dir, **kwargs)`` and
    removed before this returns.
    """
    from transformers import AutoTokenizer

    with safe_open(base, deltas) as reader, tempfile.TemporaryDirectory(prefix="deltapack-tokenizer-") as d:
        for name in reader.files():
            if name in _WEIGHTS or name.endswith(".safetensors"):
                continue
            target = os.path.join(d, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(reader.read_file(name))
        return AutoTokenizer.from_pretrained(d, **kwargs)


__all__ = ["from_pretrained", "tokenizer"]
