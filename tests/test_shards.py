"""Caption shards (virtex.data.shards): addressing, order, bad samples, exact resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from virtex import dist
from virtex.data.shards import CaptionShards, ShardSource, parse_shards
from virtex.data.tokenizer import SentencePieceTokenizer, build_vocab
from virtex.data.transforms import train_transform
from virtex.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(shapes_root, tmp_path_factory) -> SentencePieceTokenizer:
    caps = json.loads((shapes_root / "coco/annotations/captions_train2017.json").read_text())
    prefix = tmp_path_factory.mktemp("vocab") / "v"
    return SentencePieceTokenizer(build_vocab([a["caption"] for a in caps["annotations"]],
                                              prefix, vocab_size=120))


def _pattern(root: Path) -> str:
    return str(root / "shards" / "train-{00000..00007}.tar")


def _source(shards, tokenizer, batch=4, workers=0, buffer=4) -> ShardSource:
    data = CaptionShards(shards, tokenizer, train_transform(32, (0.5, 1.0)),
                         shuffle_buffer=buffer)
    return ShardSource(data, batch, num_workers=workers)


def _take(source: ShardSource, steps: int, start: int = 0, seed: int = 0, rank: int = 0,
          world: int = 1) -> list[dict]:
    out = []
    for batch in source.batches(seed, start, rank, world):
        out.append(batch)
        if len(out) == steps:
            break
    return out


def test_addressing_braces_lists_weights_and_errors(shapes_root, tokenizer):
    (one,) = parse_shards(_pattern(shapes_root))
    assert len(one.urls) == 8 and one.weight == 1.0
    a, b = parse_shards(f"0.7:{_pattern(shapes_root)}::0.3:pipe:cat {one.urls[0]}")
    assert (len(a.urls), a.weight, b.urls, b.weight) == (8, 0.7, (f"pipe:cat {one.urls[0]}",), 0.3)
    (listed,) = parse_shards(list(one.urls[:3]))
    assert listed.urls == one.urls[:3]
    with pytest.raises(UserError, match=r"shards: 2 of the 2 shards of .* do not exist"):
        parse_shards(str(shapes_root / "nowhere-{0..1}.tar"))
    data = CaptionShards(_pattern(shapes_root), tokenizer, None)
    assert data.num_samples == 48  # from sizes.json


def test_the_same_seed_gives_the_same_batches_and_workers_do_not_change_them(shapes_root,
                                                                          tokenizer):
    first = _take(_source(_pattern(shapes_root), tokenizer), 6)
    again = _take(_source(_pattern(shapes_root), tokenizer), 6)
    for x, y in zip(first, again):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["caption_tokens"], y["caption_tokens"])
    other = _take(_source(_pattern(shapes_root), tokenizer), 6, seed=1)
    assert not all(torch.equal(x["caption_tokens"], y["caption_tokens"])
                   for x, y in zip(first, other))


def _keys(batches: list[dict], tokenizer) -> list[str]:
    return [tokenizer.decode(t.tolist()) for b in batches for t in b["caption_tokens"]]


def test_resume_from_the_state_continues_at_the_exact_next_sample(shapes_root, tokenizer):
    whole = _take(_source(_pattern(shapes_root), tokenizer, workers=2), 10)
    first = _source(_pattern(shapes_root), tokenizer, workers=2)
    _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = _source(_pattern(shapes_root), tokenizer, workers=2)
    resumed.load_state_dict(state)
    rest = _take(resumed, 3, start=7)
    for x, y in zip(whole[7:], rest):
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["caption_tokens"], y["caption_tokens"])
    other = _source(_pattern(shapes_root), tokenizer, workers=1)
    other.load_state_dict(state)
    with pytest.raises(UserError, match="saved with 1 process.*x 2 loader worker"):
        _take(other, 1, start=7)


def _epoch_keys(rank: int, port: int, pattern: str, vocab: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init(rank, 2, "127.0.0.1", port, "gloo")
    try:
        source = _source(pattern, SentencePieceTokenizer(vocab), batch=4, workers=2)
        seen = []
        for step, _ in enumerate(source.batches(0, 0, rank, 2)):
            epochs = {s["sources"][0]["epoch"] for s in source.positions.values()}
            seen.append({"keys": source.last_keys, "epochs": sorted(epochs)})
            if step == 11:  # 12 steps x 2 samples x 2 ranks: the 48 samples of one epoch
                break
        Path(f"{out}.{rank}").write_text(json.dumps(seen))
    finally:
        dist.shutdown()


def test_two_processes_read_disjoint_shards_and_no_sample_twice_in_an_epoch(shapes_root,
                                                                          tokenizer, tmp_path):
    from virtex.data.shards import ShardStream

    data = CaptionShards(_pattern(shapes_root), tokenizer, None)
    streams = [ShardStream(data.sources[0], 0, k, 2, 0, 4, "caption") for k in (0, 1)]
    assert set(streams[0].share(0)).isdisjoint(streams[1].share(0))
    assert streams[0].share(0) != streams[0].share(1)  # shards reshuffled every epoch
    # two real processes, two loader workers each (4 streams), through the data source
    out = str(tmp_path / "keys")
    mp.spawn(_epoch_keys, args=(dist.free_port(), _pattern(shapes_root),
                                str(tokenizer.model_path), out), nprocs=2)
    keys = []
    for rank in (0, 1):
        steps = json.loads(Path(f"{out}.{rank}").read_text())
        assert all(s["epochs"] == [0] and len(s["keys"]) == 2 for s in steps)
        keys += [k for s in steps for k in s["keys"]]
    assert len(keys) == 48 and len(set(keys)) == 48  # every train scene, none twice
    scenes = json.loads((shapes_root / "shards" / "sizes.json").read_text())
    assert sum(scenes.values()) == 48


def _corrupt_copy(root: Path, tmp: Path) -> list[str]:
    """The shards with: a sample whose JPEG is garbage, one without caption, one truncated
    shard; plus a URL that fails."""
    out = tmp / "bad"
    shutil.copytree(root / "shards", out)
    with tarfile.open(out / "train-00000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(out / "train-00000.tar", "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 0:  # first sample's image
                data = b"not a jpeg at all"
                m.size = len(data)
            if m.name.endswith((".txt", ".json")) and members[3][0].name.split(".")[0] in m.name:
                continue  # second sample: no caption
            tar.addfile(m, io.BytesIO(data))
    blob = (out / "train-00001.tar").read_bytes()
    (out / "train-00001.tar").write_bytes(blob[: len(blob) // 2])
    return [f"{out}/train-{{00000..00007}}.tar", "pipe:false"]  # one source of 9 shards


def test_bad_samples_are_skipped_and_counted(shapes_root, tokenizer, tmp_path):
    source = _source(_corrupt_copy(shapes_root, tmp_path), tokenizer, batch=4)
    batches = _take(source, 20)
    assert all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    assert source.bad_samples() >= 2
    assert max(s["bad_shards"] for s in source.positions.values()) >= 1


def test_a_source_whose_every_shard_fails_is_one_error_not_a_hang(shapes_root, tokenizer):
    source = _source(f"{_pattern(shapes_root)}::pipe:false", tokenizer, batch=4)
    with pytest.raises(UserError, match="none of the 1 shards .*'pipe:false'.* yields a sample"):
        _take(source, 40)
