"""A store is read only as it was written: an edited manifest (k, dim, a checksum) is refused at open
and by `bahe-encode verify`; a version folder or file that is a link out of the store is refused; a
vectors.npy that is no .npy file is named as such, not as numpy's pickle message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bahe.embeddings.build import build_store
from bahe.embeddings.cli import main
from bahe.embeddings.store import MANIFEST_DIGEST, BehaviourStore, StoreError
from tests.llm_fixtures import make_tiny_llama
from tests.test_store import config, texts, write_samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real store (v000001) built once; each test works on its own copy."""
    folder = tmp_path_factory.mktemp("built")
    model = make_tiny_llama(folder / "tiny-llama")
    from bahe.ctr_data.schema import SampleSchema

    schema = SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"), dataset="tiny")
    data = write_samples(folder / "a.parquet", schema, [texts("Pay", 5)], ["T"])
    build_store(folder / "store", [data], config(model), show_progress=False)
    return folder / "store"


@pytest.fixture
def store(built, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(built, root)
    return root


def test_a_built_manifest_carries_its_digest_and_verifies(store, capsys):
    manifest = json.loads((store / "v000001" / "manifest.json").read_text())
    assert len(manifest[MANIFEST_DIGEST]) == 64
    assert main(["verify", str(store)]) == 0 and "every checksum matches" in capsys.readouterr().out


@pytest.mark.parametrize("edit", [
    lambda m: m["encoder"].update(k=3),
    lambda m: m.update(dim=64),
    lambda m: m["files"]["vectors.npy"].update(sha256="0" * 64),
    lambda m: m["model"].update(sha256="f" * 64),
], ids=["k", "dim", "a-file-checksum", "model-hash"])
def test_an_edited_manifest_is_refused_at_open_and_by_verify(store, edit, capsys):
    """Before the digest, editing k passed `verify` and training used the edited k."""
    path = store / "v000001" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(StoreError) as refused:
        BehaviourStore.open(store)
    assert f"{path} was changed after the store was written (its manifest_sha256" in str(refused.value)
    assert main(["verify", str(store)]) == 2
    assert f"{path} was changed after the store was written" in capsys.readouterr().err


def test_a_manifest_reformatted_but_unchanged_still_opens(store):
    path = store / "v000001" / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text())))  # other whitespace and key order: same content
    assert BehaviourStore.open(store).manifest["encoder"]["k"] == 2


def test_a_store_without_a_manifest_digest_opens_but_verify_asks_for_a_rebuild(store, capsys):
    """Stores written before manifests were checksummed stay readable; verify refuses them: rebuild."""
    path = store / "v000001" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest[MANIFEST_DIGEST]
    path.write_text(json.dumps(manifest))
    assert BehaviourStore.open(store).rows_count == manifest["rows"]
    assert main(["verify", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"{path} carries no manifest_sha256" in err and "rebuild the store with bahe-encode" in err


@pytest.mark.parametrize("name", ["vectors.npy", "vocab.parquet", "manifest.json"])
def test_a_file_linked_out_of_the_store_is_refused(store, tmp_path, name):
    """The same bytes, but through a link to a file outside the store folder: refused, not followed."""
    version = store / "v000001"
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(version / name, outside)
    (version / name).symlink_to(outside)
    with pytest.raises(StoreError) as refused:
        BehaviourStore.open(store)
    assert f"{version / name} is a link to {outside}, outside the store folder {store}" in str(refused.value)


def test_a_version_folder_linked_out_of_the_store_is_refused(store, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(store / "v000001", outside)
    (store / "v000001").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError) as refused:
        BehaviourStore.open(store)
    assert f"{store / 'v000001'} is a link to {outside}, outside the store folder" in str(refused.value)


def test_a_link_inside_the_store_and_a_linked_store_folder_are_fine(store, tmp_path):
    """Links are refused only when they leave the store: a store folder reached through a link, and a
    file linking to another version's file, open as usual."""
    shutil.copytree(store / "v000001", store / "v000002")
    (store / "v000002" / "vectors.npy").unlink()
    (store / "v000002" / "vectors.npy").symlink_to(Path("..") / "v000001" / "vectors.npy")
    assert BehaviourStore.open(store, "v000002").rows_count == BehaviourStore.open(store).rows_count
    (tmp_path / "alias").symlink_to(store, target_is_directory=True)
    BehaviourStore.open(tmp_path / "alias").verify()


@pytest.mark.parametrize("content, start", [(b"hello, not an array\n", b"hello,"), (b"", b""),
                                            (b"PAR1\x00\x00", b"PAR1\x00\x00")])
def test_vectors_that_are_not_a_npy_file_say_what_the_file_is(store, content, start):
    """Before: numpy's 'Cannot load file containing pickled data when allow_pickle=False'."""
    path = store / "v000001" / "vectors.npy"
    path.write_bytes(content)
    with pytest.raises(StoreError) as refused:
        BehaviourStore.open(store)
    assert f"{path} is not a NumPy .npy file (starts with {start!r}); rebuild" in str(refused.value)
