"""Layer-streamed compile: the decoder is calibrated and quantized one block at a time, with bounded memory.

Rules:
1. The graph is cut into blocks by the residual stream (:class:`BlockPartition`): the stream enters layer ``k`` at
   the value the previous layer's last writer (o/down/fc2) adds into (layer 0: ``inputs_embeds`` or the embedding
   output), and a node belongs to the latest block any of its inputs comes from. Nodes that read only graph inputs
   (rotary tables, the attention mask) form the prelude block; the final norm and ``lm_head`` form the head block.
   Constant-only nodes (a weight's DequantizeLinear) go with the blocks that read them.
2. A block runs as a standalone onnxruntime session built from its nodes (:class:`BlockSession`); its inputs
   (stream value plus side inputs: rotary tables, mask) are kept per calibration sample in an
   :class:`ActivationCache`, spilled to ``.npy`` files beyond a byte budget, and dropped after their last reader.
3. A streamed recipe is data-free graph passes (run on the whole graph: they read no weight), then whole-stream
   weight passes (``norm_folding``, ``hadamard_rotation`` on the decoder: data-free too, but they rewrite weights of
   every layer), then per-linear passes (:func:`streaming_plan`). Any other pass is refused, never silently run
   whole: MQuant's and MASQuant's passes that calibrate on the whole model or rewrite it around activations
   (``rms_split``, ``sink_scales``, ``aifs``, ``smoothquant``, ``mas``, ``cmc``, ...) do not stream.
4. A per-linear pass runs once per block on the whole graph, with the linears of other blocks held out of its
   selection and its calibration answered from the block's statistics (:class:`StreamedContext`); its records are
   merged into one. The rewritten graph is therefore the one a whole-model compile builds, node for node.
5. Inputs of block ``i+1`` (``inputs="float"``, the default): the float block ``i``'s outputs, so statistics and the
   compiled model are byte-identical to a whole-model compile. ``inputs="quantized"``: the quantized block's outputs
   (llm-compressor's sequential pipeline), so later layers calibrate on the activations they will see.
6. The weight passes run once on the whole (lazily loaded) graph before the partition, inside
   :func:`mqc.ir.initializers_stored_by`: every weight or bias they write goes to a spill file beside the output as
   soon as it is written and becomes a memory-mapped external tensor, and the mapped tensor it replaced is unmapped,
   so they hold about one weight (with its float64 temporaries) and the rotation matrix at a time. Their structural
   edits (the online Hadamard before down_proj, the entry rotation) are ordinary graph nodes.
   After a block, the tensors the per-linear pass created go to the same spill file; the float weights it read are
   unmapped. The output is saved by the standard writer, unmapping
   each tensor once written. Calibration sessions leave the weights to onnxruntime, which maps and prepacks them as
   a whole-model session does (so the statistics are the same bits): a block costs its mapped weights and their
   packed copy while it runs. Peak memory is about one block (the largest: the ``lm_head``, in the gate) plus the
   activation cache, whatever the depth.
7. The quality gate runs the float source and the compiled model block by block on the held-out samples, without
   onnxruntime's weight prepacking (a packed copy of a 2 GB lm_head beside its mapped original set the peak).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from mqc.calibration import Calibrator, TapStats
from mqc.errors import NothingToQuantizeError, RecipeError
from mqc.ir import initializers_stored_by
from mqc.model_map import WRITER_ROLES, build_model_map, residual_add_after, stream_entry
from mqc.pass_manager import CompileContext, MqcPass, PassManager, PassRecord
from mqc.session import BY_REFERENCE_BYTES

#: Data-free graph passes: run once on the whole (lazily loaded) graph, they read no weight.
GRAPH_PASSES = frozenset({"upgrade_opset", "fuse_norms"})
#: Data-free passes that rewrite weights along the whole residual stream: run once on the whole graph, each weight
#: they write spilled as soon as it is written (module rule 6).
WEIGHT_PASSES = frozenset({"norm_folding", "hadamard_rotation"})
#: Passes that quantize linear by linear from the statistics of their own inputs: they run block by block.
PER_BLOCK_PASSES = frozenset({"quantize_linears", "gptq_weights"})
STAGES = (("graph", GRAPH_PASSES), ("weight", WEIGHT_PASSES), ("per-linear", PER_BLOCK_PASSES))
INPUT_MODES = ("float", "quantized")
#: How ``mqc explain`` names a pass streamed on the quantized blocks' outputs.
QUANTIZED_INPUTS_VARIANT = ("layer-streamed: each block calibrated on the outputs of the quantized blocks before it "
                            "(llm-compressor's sequential pipeline), not of the float model")
#: Above this much weight data a compile streams by default (when its recipe can).
STREAM_THRESHOLD_BYTES = 4 << 30
#: Bytes of cached block inputs kept in memory; beyond it they are written to .npy files and memory-mapped.
ACTIVATION_BUDGET_BYTES = 1 << 30


class StreamingError(RecipeError):
    """The recipe or the model cannot be compiled layer by layer; the message says why."""


class StreamingPlan(NamedTuple):
    """A streamable recipe cut into its stages (module rule 3)."""

    graph: list[MqcPass]
    weight: list[MqcPass]
    per_block: list[MqcPass]


def streaming_plan(passes: Sequence[MqcPass]) -> StreamingPlan:
    """The stages of a streamable recipe; :class:`StreamingError` naming the pass and why otherwise."""
    stages: list[list[MqcPass]] = [[] for _ in STAGES]
    blocked, misplaced = [], []
    current = 0
    for mqc_pass in passes:
        stage = next((i for i, (_, names) in enumerate(STAGES) if mqc_pass.name in names), None)
        if stage is None:
            blocked.append(mqc_pass.name)
        elif stage < current:
            misplaced.append(mqc_pass.name)
        else:
            current = stage
            stages[stage].append(mqc_pass)
    order = ", then ".join(f"{kind} passes ({', '.join(sorted(names))})" for kind, names in STAGES)
    if blocked:
        raise StreamingError(
            f"--stream: {'pass' if len(blocked) == 1 else 'passes'} {', '.join(blocked)} of the recipe cannot run "
            f"layer by layer ({'it acts' if len(blocked) == 1 else 'they act'} on the whole model); a streamed recipe "
            f"is {order}; compile without --stream")
    if misplaced:
        raise StreamingError(f"--stream: {', '.join(misplaced)} comes after a later stage of the recipe; a streamed "
                             f"recipe is {order}; compile without --stream")
    vision = [p.name for p in stages[1] if getattr(p.params, "tower", "auto") == "vision"]
    if vision:
        raise StreamingError(f"--stream: {vision[0]} with tower='vision' rotates a vision encoder, which is not "
                             "streamed; compile without --stream")
    if not stages[2]:
        raise StreamingError("--stream: the recipe has no per-linear pass to run layer by layer")
    return StreamingPlan(*stages)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


# ------------------------------------------------------------------------------------------------------ partition


@dataclass
class Block:
    """A contiguous slice of the graph: ``index`` -1 is the prelude, 0..L-1 the layers, L the head."""

    index: int
    nodes: list[ir.Node]
    inputs: list[ir.Value] = field(default_factory=list)
    outputs: list[ir.Value] = field(default_factory=list)

    def node_ids(self) -> set[int]:
        return {id(node) for node in self.nodes}


class BlockPartition:
    """Cuts a decoder graph into prelude, layer and head blocks along its residual stream (module rule 1).

    The stream values are found once, on the float graph; :meth:`cut` can then be repeated after a pass inserted
    nodes (Q/DQ), which land in the block of the values they read."""

    def __init__(self, model: ir.Model, boundaries: dict[int, int] | None = None) -> None:
        self.model = model
        self.boundaries = boundaries if boundaries is not None else self._boundaries(model)
        self.blocks = self.cut()

    @staticmethod
    def _boundaries(model: ir.Model) -> dict[int, int]:
        """id of each stream value entering a layer -> that layer's position."""
        graph = model.graph
        if any(not attr.is_ref() and attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in graph for attr in node.attributes.values()):
            raise StreamingError("--stream: graphs with control flow (If/Loop/Scan) are not streamed")
        model_map = build_model_map(model)
        entry = stream_entry(graph, "inputs_embeds")
        if entry is None:
            raise StreamingError("--stream: no residual stream entry (inputs_embeds or an embedding Gather) found")
        last_writer = {}
        for lin in model_map.linears:
            if lin.layer is not None and lin.role in WRITER_ROLES:
                last_writer[lin.layer] = lin
        if not last_writer:
            raise StreamingError("--stream: no layer-indexed o/down linears found, so the layers cannot be cut apart")
        boundaries = {id(entry): 0}
        for position, layer in enumerate(sorted(last_writer)):
            found = residual_add_after(last_writer[layer])
            if found is None:
                raise StreamingError(f"--stream: the residual Add after {last_writer[layer].name} was not found")
            boundaries[id(found[0].outputs[0])] = position + 1
        return boundaries

    def cut(self) -> list[Block]:
        """The blocks of the graph as it is now."""
        graph = self.model.graph
        levels: dict[int, int] = {id(v): self.boundaries.get(id(v), -1) for v in graph.inputs}
        assigned: dict[int, int] = {}
        producers: dict[int, ir.Node] = {}
        for node in graph:
            for out in node.outputs:
                producers[id(out)] = node
            known = [levels[id(v)] for v in node.inputs if v is not None and id(v) in levels]
            if not known:  # reads only constants: goes with its readers
                continue
            level = max(known)
            assigned[id(node)] = level
            for out in node.outputs:
                levels[id(out)] = self.boundaries.get(id(out), level)
        wanted: dict[int, set[int]] = {}
        for node in graph:
            if id(node) in assigned:
                wanted.setdefault(assigned[id(node)], set()).add(id(node))
        for members in wanted.values():
            stack = [producers[id(v)] for node in graph if id(node) in members for v in node.inputs
                     if v is not None and id(v) in producers and id(producers[id(v)]) not in assigned]
            while stack:
                node = stack.pop()
                if id(node) not in members:
                    members.add(id(node))
                    stack.extend(producers[id(v)] for v in node.inputs if v is not None and id(v) in producers)
        blocks = [Block(index, [node for node in graph if id(node) in wanted[index]]) for index in sorted(wanted)]
        self._wire(blocks)
        return blocks

    def block(self, index: int) -> Block:
        return next(block for block in self.blocks if block.index == index)

    def _wire(self, blocks: list[Block]) -> None:
        outputs = {id(v) for v in self.model.graph.outputs}
        for block in blocks:
            produced = {id(out) for node in block.nodes for out in node.outputs}
            inputs: dict[int, ir.Value] = {}
            for node in block.nodes:
                for value in node.inputs:
                    if value is not None and not value.is_initializer() and id(value) not in produced:
                        inputs.setdefault(id(value), value)
            block.inputs = list(inputs.values())
        read_by: dict[int, int] = {}
        for block in blocks:
            for value in block.inputs:
                read_by[id(value)] = block.index
        for block in blocks:
            block.outputs = [out for node in block.nodes for out in node.outputs
                             if id(out) in outputs or read_by.get(id(out), block.index) != block.index]


# --------------------------------------------------------------------------------------------------- block runs


class BlockSession:
    """An onnxruntime session on one block's nodes, fed by name.

    Weights stored in the folder that holds most of the block's external data are left for onnxruntime to map
    from their file: it prepacks them (as a whole-model session does, so the results are the same bits) and drops
    the mapped originals, so a block costs its weights about once. Other large weights are handed over as
    OrtValues, which onnxruntime copies."""

    def __init__(self, model: ir.Model, block: Block, examples: dict[str, np.ndarray], outputs: Sequence[str],
                 providers: Sequence[str], optimization_level: str, prepack: bool = True) -> None:
        import onnxruntime as ort

        from mqc.session import session_from_proto

        graph = onnx.GraphProto(name=f"block_{block.index}")
        graph.node.extend(ir.serde.serialize_node(node) for node in block.nodes)
        for value in block.inputs:
            graph.input.append(_value_info(value.name, examples[value.name]))
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        weights = list({id(v): v for node in block.nodes for v in node.inputs
                        if v is not None and v.is_initializer()}.values())
        folder = _main_folder(weights)
        names, values = [], []
        self.tensors: list[ir.ExternalTensor] = []
        for value in weights:
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and os.fspath(tensor.base_dir) == folder:
                proto = ir.serde.serialize_tensor(tensor)  # a reference to its file: onnxruntime maps it
            elif tensor.nbytes < BY_REFERENCE_BYTES and not isinstance(tensor, ir.ExternalTensor):
                proto = ir.serde.serialize_tensor(tensor)
            else:
                if isinstance(tensor, ir.ExternalTensor):
                    self.tensors.append(tensor)
                proto = ir.serde.serialize_tensor(ir.ExternalTensor(
                    f"mqc-in-memory-{len(names)}", offset=0, length=tensor.nbytes, dtype=tensor.dtype,
                    shape=tensor.shape, name=value.name))
                names.append(value.name)
                values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy())))
            proto.name = value.name
            graph.initializer.append(proto)
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                             for d, v in model.opset_imports.items()])
        proto.ir_version = model.ir_version
        proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
        self.session = session_from_proto(proto, names, values, providers, optimization_level, folder, prepack)
        self.input_names = [value.name for value in block.inputs]
        self.outputs = list(outputs)

    def run(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.outputs, {name: values[name] for name in self.input_names})
        return dict(zip(self.outputs, results, strict=True))

    def close(self) -> None:
        """Drop the session and unmap the weights it was handed from memory maps."""
        self.session = None
        _release(self.tensors)


def _main_folder(weights: Sequence[ir.Value]) -> str | None:
    """The folder holding the most bytes of ``weights``' external data."""
    sizes: dict[str, int] = {}
    for value in weights:
        if isinstance(value.const_value, ir.ExternalTensor):
            folder = os.fspath(value.const_value.base_dir)
            sizes[folder] = sizes.get(folder, 0) + value.const_value.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _value_info(name: str, example: np.ndarray) -> onnx.ValueInfoProto:
    dtype = onnx.helper.np_dtype_to_tensor_dtype(example.dtype)
    return onnx.helper.make_tensor_value_info(name, dtype, [f"{name}_d{i}" for i in range(example.ndim)])


class ActivationCache:
    """Block inputs per calibration sample, in memory up to ``budget`` bytes, then as memory-mapped .npy files."""

    def __init__(self, samples: list[dict[str, np.ndarray]], budget: int = ACTIVATION_BUDGET_BYTES) -> None:
        self.samples = [dict(feed) for feed in samples]
        self.budget = budget
        self.in_memory = sum(a.nbytes for feed in self.samples for a in feed.values())
        self._folder: Path | None = None
        self._files = 0

    def put(self, sample: int, name: str, array: np.ndarray) -> None:
        if self.in_memory + array.nbytes > self.budget:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="mqc-stream-activations-"))
            path = self._folder / f"{self._files}.npy"
            self._files += 1
            np.save(path, array)
            array = np.load(path, mmap_mode="r")
        else:
            self.in_memory += array.nbytes
        self.samples[sample][name] = array

    def drop(self, names: Iterable[str]) -> None:
        for feed in self.samples:
            for name in names:
                array = feed.pop(name, None)
                if isinstance(array, np.ndarray) and not isinstance(array, np.memmap):
                    self.in_memory -= array.nbytes

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _last_readers(blocks: list[Block]) -> dict[str, int]:
    """Value name -> the position of the last block that reads it."""
    last: dict[str, int] = {}
    for position, block in enumerate(blocks):
        for value in block.inputs:
            last[value.name] = position
    return last


def chained_outputs(model: ir.Model, boundaries: dict[int, int] | None, feeds: list[dict[str, np.ndarray]],
                    providers: Sequence[str], optimization_level: str = "all") -> list[dict[str, np.ndarray]]:
    """The graph outputs of ``model`` on ``feeds``, computed block after block (the streamed quality gate)."""
    blocks = BlockPartition(model, boundaries).blocks
    cache = ActivationCache(feeds)
    wanted = {v.name for v in model.graph.outputs}
    last = _last_readers(blocks)
    results: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    try:
        for position, block in enumerate(blocks):
            session = BlockSession(model, block, cache.samples[0], [v.name for v in block.outputs], providers,
                                   optimization_level, prepack=False)  # a few runs: packed copies cost more than they save
            computed = [session.run(feed) for feed in cache.samples]
            session.close()
            cache.drop([name for name, reader in last.items() if reader == position])
            for sample, values in enumerate(computed):
                for name, array in values.items():
                    if name in wanted:
                        results[sample][name] = array
                    if last.get(name, -1) > position:
                        cache.put(sample, name, array)
    finally:
        cache.close()
    return results


# ------------------------------------------------------------------------------------------------------ compile


class StreamedContext(CompileContext):
    """A compile context whose per-linear passes see one block: the linears of other blocks are held out of their
    selection and calibration runs the block on its cached inputs (``block_calibration``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held_out: set[str] = set()
        self.block_calibration: Callable[[list[str], list[str], int], dict[str, TapStats]] | None = None

    def excluded(self, name: str) -> bool:
        return name in self.held_out or super().excluded(name)

    def calibrate(self, model: ir.Model, taps: Sequence[str], gram_taps: Sequence[str] = (),
                  label: str = "calibrating", sample_rows: int = 64) -> dict[str, TapStats]:
        if self.block_calibration is None:
            raise StreamingError("--stream: a pass asked for calibration outside the block being compiled")
        return self.block_calibration(list(taps), list(gram_taps), sample_rows)


class SpillFile:
    """Tensors a pass created, appended to one file and replaced by memory-mapped external tensors."""

    ALIGN = 4096

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "spill.data"
        self.path.write_bytes(b"")
        self.offset = 0

    def offload(self, value: ir.Value) -> None:
        """Move ``value``'s tensor here when it is in memory and large enough to be passed by reference."""
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < BY_REFERENCE_BYTES:
            return
        data = tensor.tobytes()
        self.offset = -(-self.offset // self.ALIGN) * self.ALIGN  # page-aligned: onnxruntime maps it in place
        with open(self.path, "r+b") as file:
            file.seek(self.offset)
            file.write(data)
        value.const_value = ir.ExternalTensor(self.path.name, offset=self.offset, length=len(data),
                                              dtype=tensor.dtype, shape=tensor.shape, name=tensor.name or value.name,
                                              base_dir=self.folder)
        self.offset += len(data)


def _release(tensors: Iterable[ir.ExternalTensor]) -> None:
    """Unmap ``tensors``; one a live array still points into stays mapped until that array is freed."""
    for tensor in tensors:
        with contextlib.suppress(BufferError):
            tensor.release()


class StreamedCompile:
    """Runs a streamable recipe on ``model`` block by block (module docstring)."""

    def __init__(self, model: ir.Model, passes: Sequence[MqcPass], context: StreamedContext, inputs: str = "float",
                 work_folder: Path | None = None) -> None:
        if inputs not in INPUT_MODES:
            raise StreamingError(f"--stream-inputs {inputs!r}: choose one of {', '.join(INPUT_MODES)}")
        self.model = model
        self.plan = streaming_plan(passes)
        self.block_passes = self.plan.per_block
        sequential = [p.name for p in self.block_passes if getattr(p.params, "hessians", None) == "sequential"]
        if sequential and inputs == "float":
            raise StreamingError(f"--stream: {sequential[0]} with hessians='sequential' needs each block's Hessians "
                                 "from the quantized blocks before it: add --stream-inputs quantized (or use "
                                 "hessians='float')")
        self.context = context
        self.inputs = inputs
        self.folder = Path(tempfile.mkdtemp(prefix=".mqc-stream-", dir=work_folder))
        self.spill = SpillFile(self.folder)
        self.partition: BlockPartition | None = None
        self._replaced: list[ir.ExternalTensor] = []
        self._forwarded: list[dict[str, np.ndarray]] | None = None

    def run(self, on_pass: Callable[[MqcPass], None] | None = None) -> list[PassRecord]:
        records = PassManager(self.plan.graph, self.context).run(self.model, on_pass=on_pass)
        with initializers_stored_by(self._spill_written):
            records += PassManager(self.plan.weight, self.context).run(self.model, on_pass=on_pass)
        _release(self._replaced)
        self._replaced = []
        self.partition = partition = BlockPartition(self.model)
        merged: list[PassRecord | None] = [None] * len(self.block_passes)
        cache = ActivationCache(list(self.context.feeds()))
        owner = {id(node): block.index for block in partition.blocks for node in block.nodes}
        linears: dict[int, set[str]] = {}
        for lin in self.context.model_map(self.model).linears:
            linears.setdefault(owner.get(id(lin.node), -1), set()).add(lin.name)
        everything = set().union(*linears.values())
        last = _last_readers(partition.blocks)
        try:
            for position, index in enumerate([block.index for block in partition.blocks]):
                block = partition.block(index)
                weights = [v.const_value for node in block.nodes for v in node.inputs
                           if v is not None and isinstance(v.const_value, ir.ExternalTensor)]
                if linears.get(index):
                    self.context.held_out = everything - linears[index]
                    self.context.block_calibration = partial(self._calibrate, block, cache=cache,
                                                             position=position, last=last)
                    for number, mqc_pass in enumerate(self.block_passes):
                        try:
                            (record,) = PassManager([mqc_pass], self.context).run(self.model, on_pass=on_pass)
                        except NothingToQuantizeError:  # every linear of this block is skipped (lm_head)
                            record = mqc_pass.record
                        merged[number] = _merge(merged[number], record, self.context.held_out)
                    self.context.block_calibration = None
                    partition.blocks = partition.cut()
                self._forward(partition.block(index), cache, position, last)
                self._offload(weights)
        finally:
            cache.close()
        for record in merged:
            if record is None or not record.layers:
                raise NothingToQuantizeError("the model has no linear layer with a constant float weight to quantize")
            if self.inputs == "quantized":
                record.variant = "; ".join(filter(None, [record.variant, QUANTIZED_INPUTS_VARIANT]))
            records.append(record)
        return records

    def _calibrate(self, block: Block, taps: list[str], gram_taps: list[str], sample_rows: int, *,
                   cache: ActivationCache, position: int, last: dict[str, int]) -> dict[str, TapStats]:
        """Statistics of ``taps`` from one run of the block as it is now; in float input mode the block's first run
        (before the pass rewrites anything) also gives the outputs the next blocks read."""
        inputs = {v.name for v in block.inputs}
        outputs = ([v.name for v in block.outputs if last.get(v.name, -1) > position]
                   if self.inputs == "float" and self._forwarded is None else [])
        wanted = list(dict.fromkeys([*(t for t in taps if t not in inputs), *outputs]))
        session = BlockSession(self.model, block, cache.samples[0], wanted, self.context.providers, "basic")
        calibrator = Calibrator(self.model, taps, self.context.default_modality, gram_taps, sample_rows=sample_rows)
        stats: dict[str, TapStats] = {}
        forwarded = []
        for sample, feed in enumerate(cache.samples):
            values = {**feed, **session.run(feed)}
            calibrator.accumulate(stats, feed, [values[t] for t in calibrator.taps], sample)
            forwarded.append({name: values[name] for name in outputs})
        session.close()
        if outputs:
            self._forwarded = forwarded
        return stats

    def _forward(self, block: Block, cache: ActivationCache, position: int, last: dict[str, int]) -> None:
        """Replace the cache's inputs read for the last time by ``block`` with its outputs (module rule 5)."""
        names = [v.name for v in block.outputs if last.get(v.name, -1) > position]
        computed, self._forwarded = self._forwarded, None
        if names and (computed is None or any(name not in computed[0] for name in names)):
            session = BlockSession(self.model, block, cache.samples[0], names, self.context.providers, "basic")
            computed = [session.run(feed) for feed in cache.samples]
            session.close()
        cache.drop([name for name, reader in last.items() if reader == position])
        for sample, values in enumerate(computed or []):
            for name in names:
                cache.put(sample, name, values[name])

    def _spill_written(self, value: ir.Value, replaced: ir.TensorProtocol | None) -> None:
        """A weight pass wrote ``value``: to the spill file if large. The mapped tensor it replaced is unmapped at
        the next write (the writer may still hold a view of it now, which keeps a mapping open)."""
        self.spill.offload(value)
        _release(self._replaced)
        self._replaced = [replaced] if isinstance(replaced, ir.ExternalTensor) else []

    def _offload(self, weights: list[ir.ExternalTensor]) -> None:
        """Tensors created while quantizing a block go to the spill file; the float weights it read are unmapped."""
        for value in self.model.graph.initializers.values():
            self.spill.offload(value)
        _release(weights)

    def gate_outputs(self, source: Path, held_out: list[dict[str, np.ndarray]]
                     ) -> tuple[list[np.ndarray], list[np.ndarray], str]:
        """(reference outputs, compiled outputs, output name) of the quality gate, both computed block by block."""
        from mqc.ir import load_model
        from mqc.quality_gate import LOGITS

        reference_model = load_model(source)
        names = [v.name for v in reference_model.graph.outputs]
        output = LOGITS if LOGITS in names else names[0]
        providers = self.context.providers
        reference = [r[output] for r in chained_outputs(reference_model, None, held_out, providers)]
        del reference_model
        assert self.partition is not None
        result = [r[output] for r in chained_outputs(self.model, self.partition.boundaries, held_out, providers)]
        return reference, result, output

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _merge(total: PassRecord | None, record: PassRecord, held_out: set[str]) -> PassRecord:
    """One record for a pass run block by block: held-out linears' skips dropped, everything else concatenated in
    block order (``matched`` is the first run's, which saw every linear)."""
    record.skipped = [skip for skip in record.skipped if skip.get("node") not in held_out]
    if total is None:
        return record
    total.skipped.extend(skip for skip in record.skipped if skip not in total.skipped)
    total.layers.extend(record.layers)
    total.notes.extend(note for note in record.notes if note not in total.notes)
    total.changed += record.changed
    total.seconds = round(total.seconds + record.seconds, 3)
    total.not_applied = total.not_applied or record.not_applied
    return total


def release_after_write() -> Callable[[Any, Any], None]:
    """A save callback that unmaps each external tensor once the writer has moved on to the next one."""
    previous: list[Any] = []

    def callback(tensor: Any, info: Any) -> None:
        while previous:
            done = previous.pop()
            if isinstance(done, ir.ExternalTensor):
                done.release()
        previous.append(tensor)

    return callback
