"""A tiny WD14-style tagger folder for tests (app/tagger.py): an ONNX model over the mean BGR colour of an 8x8 NHWC
input scoring `red_square`, `blue_square` and a rating tag, and its `selected_tags.csv`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_tagger(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # columns: red_square (R - B), blue_square (B - R), a rating that always fires (left out of captions)
    weight = np.array(
        [[-0.05, 0.05, 0.0], [0.0, 0.0, 0.0], [0.05, -0.05, 0.0]], dtype=np.float32
    )  # rows B, G, R
    bias = np.array([0.0, 0.0, 10.0], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["output"]),
        ],
        "tiny-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "selected_tags.csv").write_text(
        "tag_id,name,category,count\n1,red_square,0,10\n2,blue_square,0,10\n3,general,9,10\n",
        encoding="utf-8",
    )
    return folder
