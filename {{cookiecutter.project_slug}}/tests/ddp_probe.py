"""A callback for the DDP test: records what each rank saw and its final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.steps: list[dict[str, list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({key: outputs[key].double().tolist() for key in ("rewards", "kl/rb", "kl/mc")})

    def on_fit_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, param in sorted(pl_module.policy.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"steps": self.steps, "policy_sha256": digest.hexdigest(), "world_size": trainer.world_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
