"""numpy arrays to and from a server (needs numpy; not for Nuke's Python).

    with Client.spawn() as client, ArrayIO(client) as io:
        out, reply = io.infer("blur", {"src": rgba}, {"size": 4.0})

Local sessions pass frames through shared-memory blocks that are created once and
reused: a frame costs one copy in, the server's one write, and one copy out (none with
`copy=False`). Remote sessions send the array's own memory inline.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .client import Client, DLServerError, InferReply
from .shm import SharedBlock


class ArrayIO:
    def __init__(self, client: Client, max_blocks: int = 8) -> None:
        self.client = client
        self.max_blocks = max_blocks
        self.blocks: OrderedDict[Tuple[str, int], SharedBlock] = OrderedDict()

    @property
    def uses_shm(self) -> bool:
        return bool(self.client.shm_prefix)

    def _block(self, role: str, nbytes: int) -> SharedBlock:
        key = (role, nbytes)
        block = self.blocks.get(key)
        if block is None:
            block = SharedBlock.create(nbytes, prefix=self.client.shm_prefix or "dls")
            self.blocks[key] = block
            while len(self.blocks) > self.max_blocks:
                _, old = self.blocks.popitem(last=False)
                old.close()
                old.unlink()
        self.blocks.move_to_end(key)
        return block

    def infer(self, model: str, inputs: Dict[str, np.ndarray], *args: Any,
              **kwargs: Any) -> Tuple[Dict[str, np.ndarray], InferReply]:
        """`_infer`, retried once on a fresh embedded server when the server was lost
        (crashed or killed mid-frame); a second loss is reported."""
        try:
            return self._infer(model, inputs, *args, **kwargs)
        except DLServerError as exc:
            if exc.code != "server_gone" or not self.client.can_restart:
                raise
        for block in self.blocks.values():  # the restart unlinks the lost server's blocks
            try:
                block.close()
            except BufferError:
                pass
        self.blocks.clear()
        self.client.restart()
        return self._infer(model, inputs, *args, **kwargs)

    def _infer(self, model: str, inputs: Dict[str, np.ndarray],
              options: Optional[Dict[str, Any]] = None,
              channels: Optional[Dict[str, Sequence[str]]] = None,
              copy: bool = True, out: Optional[Dict[str, np.ndarray]] = None
              ) -> Tuple[Dict[str, np.ndarray], InferReply]:
        """Run `model` on HxWxC float32/float16 arrays. Returns its outputs as float32
        arrays: new ones; with `out`, the given arrays filled in place; with copy=False,
        views of shared memory valid until the next call."""
        declaration = self.client.model(model)
        refs: Dict[str, Dict[str, Any]] = {}
        buffers = []
        height = width = None
        for name, array in inputs.items():
            if array.ndim != 3 or array.dtype not in (np.float32, np.float16):
                raise ValueError(f"input {name!r}: need an HxWxC float32 or float16 array")
            names = list(channels[name]) if channels and name in channels else \
                declaration["inputs"].get(name, {}).get("channels", [])
            if len(names) != array.shape[2]:
                raise ValueError(f"input {name!r} has {array.shape[2]} channels; name them "
                                 f"with channels={{{name!r}: [...]}}")
            height, width = array.shape[:2]
            ref = {"format": "raw", "shape": list(array.shape), "dtype": array.dtype.name,
                   "channels": names}
            if self.uses_shm:
                block = self._block(f"in:{name}", array.nbytes)
                assert block.buf is not None
                np.copyto(np.frombuffer(block.buf, array.dtype).reshape(array.shape), array)
                refs[name] = {**ref, "kind": "shm", "name": block.name}
            else:
                buffers.append(np.ascontiguousarray(array).data)
                refs[name] = {**ref, "kind": "inline", "buffer": len(buffers) - 1}
        outputs: Dict[str, Any] = {}
        if self.uses_shm and height is not None:
            for name, layer in declaration["outputs"].items():
                nbytes = height * width * len(layer["channels"]) * 4
                outputs[name] = {"kind": "shm", "name": self._block(f"out:{name}", nbytes).name}
        reply = self.client.infer(model, refs, options, buffers, outputs=outputs)
        results = {}
        for name, ref in reply.outputs.items():
            shape = tuple(ref["shape"])
            if ref["kind"] == "shm":
                block = next(b for b in self.blocks.values() if b.name == ref["name"])
                assert block.buf is not None
                view = np.frombuffer(block.buf, np.float32, count=int(np.prod(shape))
                                     ).reshape(shape)
                if out is not None and name in out:
                    np.copyto(out[name], view)
                    results[name] = out[name]
                else:
                    results[name] = view.copy() if copy else view
            else:
                results[name] = np.frombuffer(reply.buffers[ref["buffer"]],
                                              np.dtype(ref["dtype"])).reshape(shape)
        return results, reply

    def close(self) -> None:
        """Unlink the blocks. Views returned with copy=False must be gone first."""
        while self.blocks:
            _, block = self.blocks.popitem()
            try:
                block.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping lives until it is dropped
            block.unlink()

    def __enter__(self) -> ArrayIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
