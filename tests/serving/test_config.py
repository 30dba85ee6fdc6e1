"""Settings: YAML loading, path resolution, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.config import ConfigError, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {"model": {"path": "/m", "name": "base"}, "auth": {"mode": "open"}}


def with_changes(**sections: dict) -> dict:
    raw = {"model": dict(MINIMAL["model"]), "auth": dict(MINIMAL["auth"])}
    for key, value in sections.items():
        raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "named_key"),
    [
        (with_changes(engine={"max_loras": 0}), "engine.max_loras"),
        (with_changes(engine={"max_lora_rank": "big"}), "engine.max_lora_rank"),
        (with_changes(engine={"max_loras": 8, "max_cpu_loras": 4}), "max_cpu_loras (4) must be >= max_loras (8)"),
        (with_changes(engine={"max_lora": 2}), "engine.max_lora"),  # typo: unknown keys are refused
        (with_changes(engine={"kv_cache_gib": -1}), "engine.kv_cache_gib"),
        ({"engine": {}}, "model"),
        (with_changes(model={"path": "/m"}), "model.name"),
        (with_changes(model={"path": "/m", "name": "b", "dtype": "fp8"}), "model.dtype"),
        (with_changes(adapters=[{"name": "bad name!", "path": "/a"}]), "adapters.0.name"),
        (with_changes(adapters=[{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]), "'a' is used twice"),
        (with_changes(adapters=[{"name": "base", "path": "/a"}]), "'base' is used twice"),
        (with_changes(server={"port": 70000}), "server.port"),
        ({"model": MINIMAL["model"]}, "auth"),  # open mode must be chosen explicitly
        (with_changes(auth={"mode": "api_keys"}), "needs exactly one of auth.keys_file or auth.keys_env"),
        (with_changes(auth={"mode": "open", "keys_file": "/k"}), "auth.mode open takes no keys"),
        (with_changes(auth={"mode": "none"}), "auth.mode"),
        (with_changes(adapters=[{"name": "a", "path": "/a", "tenant": "Bad Tenant"}]), "adapters.0.tenant"),
        (with_changes(limits={"rate": {"per_minute": 0, "burst": 1}}), "limits.rate.per_minute"),
        (with_changes(limits={"max_body_bytes": 10}), "limits.max_body_bytes"),
        (with_changes(routing={"auto_model": "base"}), "routing.auto_model 'base' must differ from model.name"),
        (with_changes(adapters=[{"name": "auto", "path": "/a"}], routing={}), "'auto' is used twice"),
        (with_changes(routing={"mode": "fuzzy"}), "routing.mode"),
        (with_changes(routing={"routes": [{"adapter": "a"}]}), "needs utterances, keyword rules, or both"),
    ],
)
def test_bad_config_names_the_key(raw: dict, named_key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_settings(raw, source="test.yaml")
    assert named_key in str(e.value)
    assert "test.yaml" in str(e.value)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_settings(["model"], source="x.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "../m", "name": "b"},
                "auth": {"mode": "api_keys", "keys_file": "keys.yaml"},
                "adapters": [{"name": "a", "path": "ad"}],
                "store": {"root": "st", "uploads": {"type": "local", "path": "../shared"}},
            }
        )
    )
    settings = load_settings(config)
    assert settings.store is not None and settings.store.root == (tmp_path / "configs" / "st").resolve()
    assert settings.store.uploads.model_dump() == {"type": "local", "path": (tmp_path / "shared").resolve()}
    assert settings.model.path == (tmp_path / "m").resolve()
    assert settings.adapters[0].path == (tmp_path / "configs" / "ad").resolve()
    assert settings.auth.keys_file == (tmp_path / "configs" / "keys.yaml").resolve()


def test_missing_files_are_reported_by_key(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "model": {"path": str(tmp_path / "nope"), "name": "b"},
            "auth": {"mode": "api_keys", "keys_file": str(tmp_path / "keys.yaml")},
            "adapters": [{"name": "a", "path": str(tmp_path)}],
        }
    )
    with pytest.raises(ConfigError) as e:
        settings.check_files()
    assert "model.path" in str(e.value) and "adapters[0].path" in str(e.value) and "auth.keys_file" in str(e.value)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["dev.yaml", "gpu.yaml", "secure-example.yaml", "bitnet-2b-gpu.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    settings = load_settings(REPO / "configs" / name)
    assert {a.name for a in settings.adapters} == {"code", "legal", "medical"}
    engine = settings.engine
    assert engine.max_loras is None or engine.max_cpu_loras is None or engine.max_cpu_loras >= engine.max_loras


def test_engine_args_carry_every_knob() -> None:
    from serving.engine import engine_args
    from serving.sizing import Hardware, resolve_sizing

    settings = load_settings(REPO / "configs" / "dev.yaml")
    args = engine_args(settings, resolve_sizing(settings, Hardware("cpu", frozenset())))
    engine = settings.engine
    assert args.enable_lora is True
    assert (args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (
        engine.max_loras,
        engine.max_lora_rank,
        engine.max_cpu_loras,
    )
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (engine.max_num_seqs, engine.max_num_batched_tokens)
    assert args.max_model_len == settings.model.max_model_len
    assert args.dtype == settings.model.dtype
    assert args.kv_cache_memory_bytes == int(engine.kv_cache_gib * (1 << 30))


def test_routes_file_resolves_against_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {"path": "m", "name": "b"}, "auth": {"mode": "open"}, "routing": {"routes_file": "routes/r.yaml"}}
        )
    )
    settings = load_settings(config)
    assert settings.routing.routes_file == (tmp_path / "routes" / "r.yaml").resolve()
    assert settings.routing.auto_model == "auto" and settings.routing.default is None
    assert not settings.routing.admin_enabled
    with pytest.raises(ConfigError, match="routing.routes_file: .*r.yaml does not exist"):
        settings.check_files()


@pytest.mark.parametrize(
    ("flags", "dtype"), [(frozenset({"avx2"}), "float32"), (frozenset({"avx512_bf16"}), "bfloat16")]
)
def test_engine_args_get_the_resolved_dtype_and_slots(flags: frozenset[str], dtype: str) -> None:
    """On the CPU vLLM gets the dtype the server resolved, never ``auto`` (vLLM would choose by its own rules)."""
    from serving.engine import engine_args
    from serving.sizing import Hardware, resolve_sizing

    raw = yaml.safe_load((REPO / "configs" / "dev.yaml").read_text())
    raw["model"].update(path="/m", dtype="auto")
    raw["engine"] = {"max_num_seqs": 24}
    raw["adapters"], raw["routing"] = [], None
    settings = parse_settings(raw)
    args = engine_args(settings, resolve_sizing(settings, Hardware("cpu", flags)))
    assert (args.dtype, args.max_loras, args.max_cpu_loras) == (dtype, 24, 24)
