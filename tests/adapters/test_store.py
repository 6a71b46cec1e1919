"""The adapter store (server.adapters.store): containment, atomic write / replace / remove, versions."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from server.adapters.entry import AdapterExistsError, AdapterNotFoundError
from server.adapters.errors import AdapterFormatError, AdapterPathError
from server.adapters.formats import AdapterLimits, load_adapter_dir
from server.adapters.store import AdapterStore, content_version
from server.model.config import ModelArgs
from tests.peft_reference import make_peft_adapter


def _files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def _lora_tensor(spec) -> torch.Tensor:
    """One LoRA B matrix: tells two adapters apart."""
    return spec.weights.modules[min(spec.weights.modules)].b


@pytest.fixture(scope="module")
def model_args(tiny_llama) -> ModelArgs:
    return ModelArgs.from_hf_config(json.loads((Path(tiny_llama) / "config.json").read_text()))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_factory) -> dict[str, Path]:
    """Two LoRA adapters and a prefix adapter saved by PEFT, outside any store."""
    base = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("store-sources")
    return {"a": make_peft_adapter(base, out / "a", "lora", seed=1),
            "b": make_peft_adapter(base, out / "b", "lora", seed=2),
            "prefix": make_peft_adapter(base, out / "prefix", "prefix", seed=3)}


@pytest.fixture
def store(tmp_path, model_args) -> AdapterStore:
    root = tmp_path / "root"
    root.mkdir()
    return AdapterStore(root, model_args, AdapterLimits())


def test_write_then_load_equals_reading_the_folder(store, sources, model_args):
    for name in ("a", "prefix"):
        written = store.write(name, *_files(sources[name]))
        loaded = store.load(name)
        direct = load_adapter_dir(sources[name], model_args, AdapterLimits())
        assert written.version == loaded.version == store.version(name) == content_version(*_files(sources[name]))
        assert (loaded.spec.kind, loaded.spec.size_bytes, loaded.spec.num_virtual_tokens) == (
            direct.kind, direct.size_bytes, direct.num_virtual_tokens)
    assert torch.equal(_lora_tensor(store.load("a").spec), _lora_tensor(load_adapter_dir(sources["a"], model_args,
                                                                                          AdapterLimits())))
    assert store.list_ids() == ["a", "prefix"]
    assert os.readlink(store.root / "a") == f".store/a@{store.version('a')}"


def test_hand_placed_folder_is_read_and_versioned_by_content(store, sources):
    import shutil

    shutil.copytree(sources["a"], store.root / "hand")
    assert store.version("hand") == content_version(*_files(sources["a"]))
    assert store.load("hand").version == store.version("hand")


def test_write_refuses_a_taken_id_and_replace_swaps_with_a_new_version(store, sources):
    v1 = store.write("x", *_files(sources["a"])).version
    with pytest.raises(AdapterExistsError, match="^adapter_id 'x' is already in the adapter store"):
        store.write("x", *_files(sources["b"]))
    assert store.version("x") == v1
    v2 = store.write("x", *_files(sources["b"]), replace=True).version
    assert v2 != v1 and store.version("x") == v2 == store.load("x").version
    assert torch.equal(_lora_tensor(store.load("x").spec),
                       _lora_tensor(load_adapter_dir(sources["b"], store.model, AdapterLimits())))
    kept = sorted(p.name for p in (store.root / ".store").iterdir() if p.name != "lock")
    assert kept == [f"x@{v2}"]  # the old version's folder is gone
    assert store.write("x", *_files(sources["b"]), replace=True).version == v2  # same content, same version


def test_replace_of_a_hand_placed_folder_and_remove(store, sources):
    import shutil

    shutil.copytree(sources["a"], store.root / "hand")
    store.write("hand", *_files(sources["b"]), replace=True)
    assert store.version("hand") == content_version(*_files(sources["b"]))
    assert store.remove("hand") and not store.remove("hand")
    with pytest.raises(AdapterNotFoundError, match="no folder 'hand'"):
        store.load("hand")
    assert store.version("hand") is None
    assert [p.name for p in (store.root / ".store").iterdir()] == ["lock"]


def test_invalid_adapter_is_refused_before_anything_is_written(store, sources):
    config, weights = _files(sources["a"])
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        store.write("bad", b"{", weights)
    with pytest.raises(AdapterFormatError, match="max_lora_rank"):
        AdapterStore(store.root, store.model, AdapterLimits(max_lora_rank=2)).write("big", config, weights)
    assert not os.path.lexists(store.root / "bad") and not os.path.lexists(store.root / "big")
    assert not (store.root / ".store").exists() or [p.name for p in (store.root / ".store").iterdir()] == ["lock"]


def test_a_crashed_writers_leftovers_are_swept_and_never_read(store, sources):
    store.write("a", *_files(sources["a"]))
    tmp = store.root / ".store" / ".tmp-crashed"
    tmp.mkdir()
    (tmp / "adapter_config.json").write_bytes(b"{half")
    assert store.load("a").version == store.version("a")
    store.write("b", *_files(sources["b"]))
    assert not tmp.exists()


ID_REFUSALS = ["..", "../a", "a/b", "/etc", ".store", ".hidden", "", "x" * 129, "caf\u00e9", "a\x00b", "a b"]


@pytest.mark.parametrize("adapter_id", ID_REFUSALS, ids=repr)
def test_ids_outside_the_rules_are_refused_for_reads_and_writes(store, sources, adapter_id):
    with pytest.raises(AdapterFormatError, match="^'.*' is not a valid adapter id"):  # the caller names its field
        store.load(adapter_id)
    for write in (lambda: store.write(adapter_id, *_files(sources["a"])), lambda: store.write_folder(adapter_id, "a"),
                  lambda: store.remove(adapter_id)):  # writes name the admin requests' field
        with pytest.raises(AdapterFormatError, match="^adapter_id: '.*' is not a valid adapter id"):
            write()


def test_paths_an_attacker_could_plant_are_refused(store, sources, tmp_path):
    import shutil

    root = store.root
    outside = tmp_path / "outside"
    shutil.copytree(sources["a"], outside)
    (root / "escape").symlink_to(outside)  # a symlink out of the root
    (root / "loop").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop")
    (root / "file").write_bytes(b"not a folder")  # a file where a folder is expected
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "inner").mkdir()  # a folder whose weights file leads out of the root
    shutil.copy(sources["a"] / "adapter_config.json", root / "inner")
    (root / "inner" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "fifo").mkdir()
    shutil.copy(sources["a"] / "adapter_config.json", root / "fifo")
    os.mkfifo(root / "fifo" / "adapter_model.safetensors")
    (root / "huge").mkdir()
    shutil.copy(sources["a"] / "adapter_config.json", root / "huge")
    with open(root / "huge" / "adapter_model.safetensors", "wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB on paper, refused by its size before any read
    os.mkdir(os.fsencode(root) + b"/\xff\xfe")  # a name that is not UTF-8
    cases = {"escape": (AdapterPathError, "leading outside the adapter root"),
             "loop": (AdapterPathError, "a symlink loop"),
             "file": (AdapterPathError, "is not a folder"),
             "dangling": (AdapterNotFoundError, "no folder 'dangling'"),
             "missing": (AdapterNotFoundError, "no folder 'missing'"),
             "inner": (AdapterPathError, "symlink leading outside the adapter root"),
             "fifo": (AdapterFormatError, "not a regular file"),
             "huge": (AdapterFormatError, "larger than any adapter within the limits")}
    for adapter_id, (kind, fragment) in cases.items():
        with pytest.raises(kind, match=fragment) as info:
            store.load(adapter_id)
        assert str(tmp_path) not in str(info.value)  # never the server's own paths
    assert store.list_ids() == ["escape", "fifo", "huge", "inner"]  # folders (or links to folders) by valid ids
    assert store.remove("escape") and outside.is_dir()  # the link goes, never what it points to
    assert (outside / "adapter_model.safetensors").exists()


def test_readers_never_see_half_of_a_replace(store, sources):
    """A reader loading while a writer replaces and removes sees version a or b whole, or NOT_FOUND."""
    want = {content_version(*_files(sources[n])): _lora_tensor(load_adapter_dir(sources[n], store.model, AdapterLimits()))
            for n in "ab"}
    store.write("x", *_files(sources["a"]))
    stop, seen, errors = threading.Event(), {"found": 0, "missing": 0}, []

    def read() -> None:
        while not stop.is_set():
            try:
                got = store.load("x")
            except AdapterNotFoundError:
                seen["missing"] += 1
                continue
            except Exception as e:  # anything else is a torn read
                errors.append(e)
                return
            if got.version not in want or not torch.equal(_lora_tensor(got.spec), want[got.version]):
                errors.append(AssertionError("weights do not match the version"))
                return
            seen["found"] += 1

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(20):
            store.write("x", *_files(sources["ab"[i % 2]]), replace=True)
            if i % 7 == 6:
                store.remove("x")
                store.write("x", *_files(sources["a"]))
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors
    assert seen["found"] > 0


def test_two_writers_sharing_a_root_leave_one_whole_version(store, sources):
    """Two store objects (as two processes would) replace one id concurrently: the folder lock serializes them."""
    other = AdapterStore(store.root, store.model, store.limits)
    errors = []

    def write(s: AdapterStore, name: str) -> None:
        try:
            for _ in range(15):
                s.write("x", *_files(sources[name]), replace=True)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(store, "a")), threading.Thread(target=write, args=(other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    version = store.version("x")
    assert version in {content_version(*_files(sources[n])) for n in "ab"}
    assert sorted(p.name for p in (store.root / ".store").iterdir()) == ["lock", f"x@{version}"]


def test_write_folder_copies_a_folder_under_the_root_and_keeps_the_ids_own(store, sources):
    import shutil

    shutil.copytree(sources["a"], store.root / "runs" / "a")
    written = store.write_folder("copy", "runs/a")
    assert written.version == content_version(*_files(sources["a"])) == store.version("copy")
    with pytest.raises(AdapterPathError, match="contains '..'"):
        store.write_folder("up", "../outside")
    shutil.copytree(sources["b"], store.root / "own")
    assert store.write_folder("own", "own").version == content_version(*_files(sources["b"]))
    assert (store.root / "own").is_dir() and not (store.root / "own").is_symlink()  # left as it was
