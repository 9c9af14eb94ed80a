"""ONNX's own backend tests, run through cnnc's Backend: every case of the ops cnnc supports.

The cases come from onnx.backend.test: the node tests, the PyTorch-converted model and
operator tests, and the "simple" models, selected when every op of the case is one cnnc
imports. A selected case either passes (outputs within the case's own tolerance), or is
in EXCLUDED below with the reason, and then cnnc must refuse it with a clear error: never
crash, never answer wrong. The session summary prints both counts.
"""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner

import cnnc
from cnnc.backends.onnx_backend import CnncBackend

SUPPORTED_OPS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu",
    "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Gemm", "MatMul", "Softmax", "Flatten", "Reshape",
    "Transpose", "BatchNormalization", "LRN", "Dropout", "Add", "Concat", "Identity", "Sum",
    "Mul", "Sub", "Div", "Unsqueeze", "Squeeze", "Constant", "HardSwish", "HardSigmoid",
    "Gelu", "Mish", "Elu", "PRelu", "Softplus", "Pad", "Split", "Slice", "Shape", "Resize",
    "Upsample", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
}  # fmt: skip
KINDS = ("node", "pytorch-converted", "pytorch-operator", "simple")

EXCLUDED: dict[str, str] = {}
_REASONS = {
    # cnnc computes in float32; integer, double, optional and sequence inputs are refused.
    "inputs that are not float32 tensors": (
        "test_add_int16", "test_add_int8", "test_add_uint16", "test_add_uint32",
        "test_add_uint64", "test_add_uint8", "test_clip_default_int8_inbounds",
        "test_clip_default_int8_inbounds_expanded", "test_clip_default_int8_max",
        "test_clip_default_int8_min", "test_div_int16", "test_div_int32_trunc", "test_div_int8",
        "test_div_uint16", "test_div_uint32", "test_div_uint64", "test_div_uint8",
        "test_maxpool_2d_uint8", "test_mul_int16", "test_mul_int8", "test_mul_uint16",
        "test_mul_uint32", "test_mul_uint64", "test_mul_uint8", "test_sub_int16",
        "test_sub_int8", "test_sub_uint16", "test_sub_uint32", "test_sub_uint64",
        "test_sub_uint8", "test_identity_opt", "test_identity_sequence",
        "test_operator_add_broadcast", "test_operator_add_size1_broadcast",
        "test_operator_add_size1_right_broadcast", "test_operator_add_size1_singleton_broadcast",
        "test_operator_addconstant", "test_operator_non_float_params", "test_edge_pad",
        "test_reflect_pad", "test_wrap_pad",
    ),
    # cnnc's windows are 1-D and 2-D (C×L and C×H×W maps).
    "3-D convolution and pooling": (
        "test_AvgPool3d", "test_AvgPool3d_stride", "test_AvgPool3d_stride1_pad0_gpu_input",
        "test_Conv3d", "test_Conv3d_dilated", "test_Conv3d_dilated_strided", "test_Conv3d_groups",
        "test_Conv3d_no_bias", "test_Conv3d_stride", "test_Conv3d_stride_padding",
        "test_convtranspose_3d",
        "test_MaxPool3d", "test_MaxPool3d_stride", "test_MaxPool3d_stride_padding",
        "test_averagepool_3d_default",
        "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False",
        "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True",
        "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False",
        "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True",
        "test_averagepool_3d_dilations_small", "test_maxpool_3d_default",
        "test_maxpool_3d_dilations", "test_maxpool_3d_dilations_use_ref_impl",
        "test_maxpool_3d_dilations_use_ref_impl_large",
    ),
    # cnnc compiles inference only.
    "training mode and Dropout's mask": (
        "test_batchnorm_epsilon_training_mode", "test_batchnorm_example_training_mode",
        "test_training_dropout", "test_training_dropout_default",
        "test_training_dropout_default_mask", "test_training_dropout_mask",
        "test_training_dropout_zero_ratio", "test_training_dropout_zero_ratio_mask",
        "test_dropout_default_mask", "test_dropout_default_mask_ratio",
    ),
    # The first axis is the batch: it is never concatenated, flattened, moved or reshaped.
    "ops along or across the batch axis": (
        "test_concat_1d_axis_0", "test_concat_1d_axis_negative_1", "test_concat_2d_axis_0",
        "test_concat_2d_axis_negative_2", "test_concat_3d_axis_0", "test_concat_3d_axis_2",
        "test_concat_3d_axis_negative_1", "test_concat_3d_axis_negative_3",
        "test_flatten_axis0", "test_flatten_axis2", "test_flatten_axis3",
        "test_flatten_negative_axis1", "test_flatten_negative_axis2",
        "test_flatten_negative_axis3", "test_flatten_negative_axis4",
        "test_reshape_negative_extended_dims", "test_reshape_one_dim",
        "test_reshape_reordered_all_dims", "test_reshape_allowzero_reordered", "test_squeeze",
        "test_unsqueeze_axis_0", "test_transpose_all_permutations_2",
        "test_transpose_all_permutations_3", "test_transpose_all_permutations_4",
        "test_transpose_all_permutations_5", "test_transpose_default", "test_operator_view",
        "test_operator_chunk", "test_slice", "test_split_1d_uneven_split_opset18",
        "test_split_equal_parts_1d_opset13", "test_split_equal_parts_1d_opset18",
        "test_split_equal_parts_default_axis_opset13",
        "test_split_equal_parts_default_axis_opset18", "test_split_variable_parts_1d_opset13",
        "test_split_variable_parts_1d_opset18", "test_split_variable_parts_default_axis_opset13",
        "test_split_variable_parts_default_axis_opset18", "test_split_zero_size_splits_opset13",
        "test_split_zero_size_splits_opset18",
    ),
    # Concat joins channels: a causal conv's state joined along the length is refused.
    "concatenation along a spatial axis": (
        "test_causal_conv_with_state_decode_step_expanded",
        "test_causal_conv_with_state_with_bias_and_past_state_expanded",
        "test_causal_conv_with_state_with_past_state_expanded",
    ),
    # slice takes positions start..end-1 of one axis, with step 1, and never none of them.
    "slices with other steps, or empty": ("test_slice_neg_steps", "test_slice_start_out_of_bounds"),
    # cnnc's fc layer is an N×F input times a constant matrix, plus a bias per output.
    "matrix products that are not an fc layer": (
        "test_gemm_all_attributes", "test_gemm_transposeA", "test_gemm_default_matrix_bias",
        "test_matmul_1d_1d", "test_matmul_1d_3d", "test_matmul_3d", "test_matmul_4d",
        "test_matmul_4d_1d", "test_matmul_bcast", "test_operator_addmm",
    ),
    # Every computed value carries the batch axis first; ONNX aligns ranks from the right.
    "arithmetic between computed values of different ranks": (
        "test_add_bcast", "test_div_bcast", "test_mul_bcast", "test_sub_bcast",
    ),
    # cnnc's prelu learns one slope, or one per channel (axis 1).
    "PRelu slopes along other axes than the channels": (
        "test_prelu_broadcast", "test_prelu_example",
    ),
    "MaxPool's Indices output and storage order": (
        "test_maxpool_with_argmax_2d_precomputed_pads",
        "test_maxpool_with_argmax_2d_precomputed_strides",
    ),
    # Shape's output is a shape: what cnnc computes at import, not at run time.
    "a graph whose output is a constant or a shape": (
        "test_constant", "test_shape", "test_shape_clip_end", "test_shape_clip_start",
        "test_shape_end_1", "test_shape_end_negative_1", "test_shape_example",
        "test_shape_start_1", "test_shape_start_1_end_2", "test_shape_start_1_end_negative_1",
        "test_shape_start_greater_than_end", "test_shape_start_negative_1",
    ),
    # upsample has PyTorch's modes: nearest, nearest_exact, linear and bilinear.
    "Resize's cubic mode": (
        "test_resize_downsample_scales_cubic", "test_resize_downsample_scales_cubic_align_corners",
        "test_resize_downsample_scales_cubic_A_n0p5_exclude_outside",
        "test_resize_downsample_sizes_cubic", "test_resize_upsample_scales_cubic",
        "test_resize_upsample_scales_cubic_A_n0p5_exclude_outside",
        "test_resize_upsample_scales_cubic_align_corners",
        "test_resize_upsample_scales_cubic_asymmetric", "test_resize_upsample_sizes_cubic",
    ),
    "Resize with antialias": (
        "test_resize_downsample_scales_cubic_antialias",
        "test_resize_downsample_scales_linear_antialias",
        "test_resize_downsample_sizes_cubic_antialias",
        "test_resize_downsample_sizes_linear_antialias",
    ),
    "Resize that crops (tf_crop_and_resize) or keeps the aspect ratio": (
        "test_resize_tf_crop_and_resize", "test_resize_tf_crop_and_resize_axes_2_3",
        "test_resize_tf_crop_and_resize_axes_3_2",
        "test_resize_tf_crop_and_resize_extrapolation_value",
        "test_resize_downsample_sizes_nearest_not_larger",
        "test_resize_downsample_sizes_nearest_not_smaller",
        "test_resize_upsample_sizes_nearest_not_larger",
        "test_resize_upsample_sizes_nearest_not_smaller",
    ),
    # Each of these samples other pixels, or weighs them otherwise, than PyTorch does.
    "Resize coordinates that no PyTorch mode computes": (
        "test_resize_downsample_scales_linear_half_pixel_symmetric",
        "test_resize_upsample_scales_linear_half_pixel_symmetric",
        "test_resize_downsample_sizes_nearest",
        "test_resize_upsample_sizes_nearest_ceil_half_pixel",
        "test_resize_upsample_sizes_nearest_floor_align_corners",
        "test_resize_upsample_sizes_nearest_round_prefer_ceil_asymmetric",
        "test_resize_downsample_sizes_linear_pytorch_half_pixel",
        # align_corners by scales whose output length is not whole: ONNX's formula divides
        # by the unrounded length - 1, onnxruntime and PyTorch by the output size - 1.
        "test_resize_downsample_scales_linear_align_corners",
    ),
    # cnnc's layernorm has one output; ONNX's LayerNormalization cases all read its Mean
    # and InvStdDev too.
    "LayerNormalization's Mean and InvStdDev outputs": (
        "test_layer_normalization_2d_axis0", "test_layer_normalization_2d_axis1",
        "test_layer_normalization_2d_axis_negative_1",
        "test_layer_normalization_2d_axis_negative_2",
        "test_layer_normalization_3d_axis0_epsilon", "test_layer_normalization_3d_axis1_epsilon",
        "test_layer_normalization_3d_axis2_epsilon",
        "test_layer_normalization_3d_axis_negative_1_epsilon",
        "test_layer_normalization_3d_axis_negative_2_epsilon",
        "test_layer_normalization_3d_axis_negative_3_epsilon",
        "test_layer_normalization_4d_axis0", "test_layer_normalization_4d_axis1",
        "test_layer_normalization_4d_axis2", "test_layer_normalization_4d_axis3",
        "test_layer_normalization_4d_axis_negative_1",
        "test_layer_normalization_4d_axis_negative_2",
        "test_layer_normalization_4d_axis_negative_3",
        "test_layer_normalization_4d_axis_negative_4", "test_layer_normalization_default_axis",
    ),
}  # fmt: skip
for _reason, _names in _REASONS.items():
    EXCLUDED.update(dict.fromkeys(_names, _reason))


def _model(case) -> onnx.ModelProto:
    return case.model or onnx.load(os.path.join(case.model_dir, "model.onnx"))


def _array(tensor) -> np.ndarray:
    return numpy_helper.to_array(tensor) if isinstance(tensor, onnx.TensorProto) else tensor


def _data_sets(case) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    if case.data_sets is not None:
        sets = case.data_sets
    else:
        sets = []
        for folder in sorted(glob.glob(os.path.join(case.model_dir, "test_data_set_*"))):
            sets.append(tuple(
                [onnx.load_tensor(f) for f in sorted(glob.glob(f"{folder}/{kind}_*.pb"))]
                for kind in ("input", "output")
            ))  # fmt: skip
    return [([_array(a) for a in ins], [_array(a) for a in outs]) for ins, outs in sets]


def _selected() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader builds every case, some overflow on purpose
        cases = {}
        for kind in KINDS:
            for case in load_model_tests(kind=kind):
                ops = {n.op_type for n in _model(case).graph.node}
                if ops and ops <= SUPPORTED_OPS:
                    cases[case.name] = case
    return cases


SELECTED = _selected()
RUN = sorted(n for n in SELECTED if n not in EXCLUDED)
REFUSED = sorted(n for n in SELECTED if n in EXCLUDED)


def run_case(case) -> None:
    for inputs, expected in _data_sets(case):
        outputs = CnncBackend.run_model(_model(case), inputs)
        Runner.assert_similar_outputs(
            expected, list(outputs), rtol=case.rtol, atol=case.atol, model_dir=case.model_dir
        )


def test_the_selection_covers_every_supported_op():
    ops = {n.op_type for name in RUN for n in _model(SELECTED[name]).graph.node}
    # The suite's LayerNormalization cases all have the statistics outputs; cnnc's forms
    # are tested in test_norms.
    assert ops >= SUPPORTED_OPS - {"Constant", "LayerNormalization"}
    assert len(RUN) >= 150


def test_every_exclusion_names_a_selected_case():
    assert sorted(set(EXCLUDED) - set(SELECTED)) == []


@pytest.mark.parametrize("name", RUN)
def test_backend_case_passes(name):
    run_case(SELECTED[name])


@pytest.mark.parametrize("name", REFUSED)
def test_excluded_case_is_refused_with_a_clear_error(name):
    with pytest.raises(cnnc.CnncError) as info:
        run_case(SELECTED[name])
    assert info.value.render().count("\n") < 4  # one report, no traceback text
