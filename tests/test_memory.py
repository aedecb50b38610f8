"""Weights in 2 MiB pages: what the kernel reports for the mapping, the values, ties, and the mapping's end."""

import gc

import pytest
import torch

from hybridlm.checkpoints import from_pretrained, save_pretrained
from hybridlm.loading import load_model
from hybridlm.memory import HUGE_PAGE_BYTES, empty_in_huge_pages, huge_pages_available, move_to_huge_pages
from hybridlm.model import HybridLM
from tests.helpers import tiny_config

needs_huge_pages = pytest.mark.skipif(not huge_pages_available(), reason="the host has transparent huge pages off")


def mapping_of(address: int) -> dict[str, int] | None:
    """The /proc/self/smaps entry (its kB fields and its start) of the mapping holding ``address``."""
    entry = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                entry = {"start": start} if start <= address < end else None
            elif entry is not None and head.endswith(":") and line.split()[-1] == "kB":
                entry[head[:-1]] = int(line.split()[1])
                if head == "VmFlags:":
                    break
            elif entry is not None and head == "VmFlags:":
                break
    return entry


@needs_huge_pages
def test_tensors_lie_apart_in_one_mapping_of_huge_pages():
    a, b, c = empty_in_huge_pages(
        [torch.Size([1024, 1024]), torch.Size([3]), torch.Size([512, 1024])], [torch.float32] * 3
    )
    for t, value in ((a, 1.0), (b, 2.0), (c, 3.0)):
        t.fill_(value)
    assert (a == 1).all() and (b == 2).all() and (c == 3).all()  # no overlap
    assert a.data_ptr() % HUGE_PAGE_BYTES == 0 and all(t.data_ptr() % 64 == 0 for t in (a, b, c))
    mapping = mapping_of(a.data_ptr())
    assert mapping is not None and mapping_of(c.data_ptr())["start"] == mapping["start"]  # one mapping
    assert mapping["AnonHugePages"] >= 2048  # at least a's first 2 MiB, as the kernel counts it


@needs_huge_pages
def test_moving_a_model_keeps_its_outputs_and_ties():
    torch.manual_seed(0)
    model = HybridLM(tiny_config("ME*E", hidden_size=256, vocab_size=4096, tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 4096, (2, 9))
    with torch.inference_mode():
        expected = model(ids).logits
    large = [p for p in model.parameters() if p.numel() * p.element_size() >= HUGE_PAGE_BYTES]
    before = [p.data_ptr() for p in large]
    assert move_to_huge_pages(model) == sum(p.numel() * p.element_size() for p in large) > 0
    assert all(p.data_ptr() != b for p, b in zip(large, before, strict=True))
    assert model.lm_head.weight is model.embeddings.weight
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)


@needs_huge_pages
def test_a_loaded_checkpoint_reads_straight_into_huge_pages_and_gives_them_back(tmp_path):
    torch.manual_seed(0)
    source = HybridLM(tiny_config("ME*E", hidden_size=256, vocab_size=4096)).eval()
    save_pretrained(source, tmp_path / "ckpt")
    model = from_pretrained(tmp_path / "ckpt")
    embedding = model.embeddings.weight  # 4 MiB in fp32
    assert torch.equal(embedding, source.embeddings.weight)
    start = mapping_of(embedding.data_ptr())["start"]
    assert mapping_of(embedding.data_ptr())["AnonHugePages"] > 0
    del model, embedding
    gc.collect()
    assert mapping_of(start) is None  # the mapping went with the last weight in it


def test_presets_and_other_devices_load_as_before():
    model = load_model("debug-tiny", quiet=True)  # small weights: nothing to move, nothing refused
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert move_to_huge_pages(torch.nn.Linear(4, 4)) == 0


def test_no_address_space_for_the_mapping_leaves_the_allocator_to_it():
    """Under an address-space limit the mapping cannot be made: None (the caller allocates as before), not
    an OSError from the loader."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from hybridlm.memory import empty_in_huge_pages\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
        "print(empty_in_huge_pages([torch.Size([2**30])], [torch.float32]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr[-2000:]
