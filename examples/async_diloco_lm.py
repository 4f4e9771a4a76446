"""Asynchronous DiLoCo: a tiny character-level transformer learns to write Python from the standard
library's own source code.

3 peers each train on a different slice of the same text (a few modules of the Python standard
library, read from ``os.path.dirname(os.__file__)``, so it is on every machine already) with
``DiLoCo(..., asynchronous=True)``: the pseudo-gradients of one phase are all-reduced in the
background while the next phase trains, and applied one phase late, so the network time hides behind
compute. It prints the mean training loss of every outer step, then a greedy sample from the trained
model and a summary that checks the outer state is bit-identical on every peer.

Run it (the master and the peers on this machine):

    python examples/async_diloco_lm.py [--peers 3] [--inner-steps 25] [--outer-steps 60]

On real machines: start a master on one of them, then one peer per machine (I = 0 .. N-1); every
peer waits until all N are in, then trains on slice I of the text:

    python -m pccl.master --listen-address 0.0.0.0:48148                            # on 10.0.0.1
    python examples/async_diloco_lm.py --master 10.0.0.1:48148 --peers N --index I

(the state digests the machines print at the end must be equal.)
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from launch import Launcher, run_main, wait_for_peers

# Modules that are single files in every Python from 3.10 on; a missing one is skipped.
SOURCE_MODULES = ("argparse.py", "functools.py", "textwrap.py", "contextlib.py", "dataclasses.py", "shutil.py")
# A fixed vocabulary (newline and printable ASCII), the same on every machine whatever its text;
# any other character reads as "?".
VOCABULARY = "\n" + "".join(chr(c) for c in range(32, 127))
CONTEXT = 64
WIDTH = 64
LAYERS = 2
HEADS = 4
BATCH = 16
INNER_LR = 3e-3
SAMPLE_PROMPT = "    def "
SAMPLE_CHARACTERS = 160


def read_text_slice(index: int, peers: int) -> str:
    """Slice `index` of `peers` equal slices of the standard library modules' concatenated source."""
    folder = Path(os.__file__).parent
    text = "".join((folder / name).read_text(encoding="utf-8") for name in SOURCE_MODULES if (folder / name).exists())
    return text[index * len(text) // peers:(index + 1) * len(text) // peers]


def encode(text: str):
    import numpy as np
    import torch
    table = np.full(128, VOCABULARY.index("?"), dtype=np.int64)
    for i, character in enumerate(VOCABULARY):
        table[ord(character)] = i
    return torch.from_numpy(table[np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8)])


def make_model():
    """A pre-norm causal transformer: embeddings, LAYERS encoder blocks with a causal mask, a head."""
    import torch
    from torch import nn

    class CharTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(len(VOCABULARY), WIDTH)
            self.position = nn.Embedding(CONTEXT, WIDTH)
            block = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(block, LAYERS, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(WIDTH)
            self.head = nn.Linear(WIDTH, len(VOCABULARY))
            self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

        def forward(self, tokens):
            length = tokens.shape[1]
            h = self.embed(tokens) + self.position(torch.arange(length))
            h = self.blocks(h, mask=self.causal[:length, :length], is_causal=True)
            return self.head(self.norm(h))

    torch.manual_seed(0)
    return CharTransformer()


def greedy_sample(model, prompt: str, characters: int) -> str:
    import torch
    tokens = encode(prompt).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        for _ in range(characters):
            next_token = model(tokens[:, -CONTEXT:])[0, -1].argmax()
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    model.train()
    return "".join(VOCABULARY[t] for t in tokens[0].tolist())




def peer(events, master: str, index: int, peers: int, inner_steps: int, outer_steps: int) -> None:
    import torch

    import pccl
    from pccl.diloco import DiLoCo

    torch.set_num_threads(1)  # several peers share this machine's cores
    tokens = encode(read_text_slice(index, peers))
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=INNER_LR)
    comm = pccl.Communicator(master, peer_group=0, p2p_connection_pool_size=1)
    comm.connect(n_attempts=20)
    wait_for_peers(comm, peers)
    diloco = DiLoCo(model, inner, comm, inner_steps=inner_steps, asynchronous=True)
    diloco.join()
    events.put({"kind": "start", "index": index, "characters": len(tokens),
                "parameters": sum(p.numel() for p in model.parameters())})

    generator = torch.Generator().manual_seed(index)
    phase_losses, tx_bytes, phase = [], 0, 0
    while diloco.outer_step < outer_steps:
        starts = torch.randint(0, len(tokens) - CONTEXT - 1, (BATCH,), generator=generator)
        window = torch.stack([tokens[s:s + CONTEXT + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCABULARY)), window[:, 1:].reshape(-1))
        loss.backward()
        inner.step()
        inner.zero_grad()
        phase_losses.append(loss.item())
        report = diloco.step()
        if report is not None:
            tx_bytes += report.reduce_tx_bytes + report.sync_tx_bytes
            events.put({"kind": "phase", "index": index, "phase": phase, "loss": sum(phase_losses) / len(phase_losses),
                        "outer_step": report.outer_step, "applied": report.applied,
                        "contributors": report.contributors, "waited_s": report.waited_s})
            phase_losses, phase = [], phase + 1
    last = diloco.finish()  # the reduce still in flight: apply it, so the model holds every phase's work
    if last is not None:
        tx_bytes += last.reduce_tx_bytes
    events.put({"kind": "result", "index": index, "outer_step": diloco.outer_step, "tx_bytes": tx_bytes,
                "digest": diloco.state_digest(), "sample": greedy_sample(model, SAMPLE_PROMPT, SAMPLE_CHARACTERS)})
    comm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, help="peers in the group (default 3; --smoke: 2)")
    parser.add_argument("--inner-steps", type=int, help="H, inner steps per outer step (default 25; --smoke: 5)")
    parser.add_argument("--outer-steps", type=int, help="train until this many outer steps are applied; finish() "
                                                        "then applies the one in flight (default 60; --smoke: 3)")
    parser.add_argument("--master", help="HOST:PORT of a running master; default: start one here")
    parser.add_argument("--index", type=int, help="with --master: run only peer INDEX here")
    parser.add_argument("--smoke", action="store_true", help="2 peers, 3 short outer steps: a quick check")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up after this long")
    args = parser.parse_args()
    peers = args.peers or (2 if args.smoke else 3)
    inner_steps = args.inner_steps or (5 if args.smoke else 25)
    outer_steps = args.outer_steps or (3 if args.smoke else 60)
    indices = [args.index] if args.index is not None else list(range(peers))

    phases: dict[int, list[dict]] = defaultdict(list)
    results: list[dict] = []
    started = time.monotonic()
    with Launcher(args.master, args.timeout_s) as run:
        print(f"master {run.master}; peer(s) {indices} of {peers}; asynchronous DiLoCo, {outer_steps} outer steps "
              f"of H={inner_steps} inner steps")
        for i in indices:
            run.start(f"peer {i}", peer, run.master, i, peers, inner_steps, outer_steps)
        # The first phase has nothing to apply yet (its reduce is the one in flight), so reaching
        # outer_steps takes one phase more; finish() then applies the last phase's reduce.
        with tqdm(total=outer_steps + 1, desc="outer phases", unit="phase") as bar:
            for event in run.follow():
                if event["kind"] == "start":
                    bar.write(f"peer {event['index']}: {event['characters']:,} characters of stdlib source, "
                              f"a transformer of {event['parameters']:,} parameters")
                elif event["kind"] == "phase":
                    reports = phases[event["phase"]]
                    reports.append(event)
                    if len(reports) == len(indices):
                        loss = sum(r["loss"] for r in reports) / len(reports)
                        applied = (f"applied the previous phase's reduce from {reports[0]['contributors']} peer(s)"
                                   if reports[0]["applied"] else "nothing to apply yet")
                        waited = max(r["waited_s"] for r in reports)
                        bar.write(f"phase {event['phase'] + 1:3d}: training loss {loss:.3f} (mean over "
                                  f"{len(reports)} peer(s)); {applied}; waited {waited:.2f} s; outer step "
                                  f"{reports[0]['outer_step']}")
                        bar.update()
                elif event["kind"] == "result":
                    results.append(event)
    if len(results) != len(indices):
        print(f"summary: only {len(results)} of {len(indices)} peers finished")
        return 1

    print(f"greedy sample from peer {results[0]['index']}:\n{results[0]['sample'].rstrip()}\n")
    identical = len({r["digest"] for r in results}) == 1
    final_loss = sum(r["loss"] for r in phases[max(phases)]) / len(phases[max(phases)])
    print(f"summary: {results[0]['outer_step']} outer steps (the last applied by finish()) in "
          f"{time.monotonic() - started:.0f} s; last phase's "
          f"training loss {final_loss:.3f}; {sum(r['tx_bytes'] for r in results):,} bytes sent by "
          f"{len(results)} peer(s); outer state identical on the {len(results)} peer(s) here (digest "
          f"{', '.join(sorted({r['digest'][:16] for r in results}))}): {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    run_main(main)
