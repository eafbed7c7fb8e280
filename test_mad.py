"""Tests of MAD, all on CPU:  python -m pytest -q test_mad.py   (about 8 minutes on 2 cores)

Claim -> test, section by section, in the order of the file.

3.1 Task tokenization
  one vocabulary, a token range per task: test_vocabulary_layout_by_hand
  coordinate bins and their centres:
      test_quantize_floors_into_bins_clamps_and_dequantize_returns_bin_centres,
      test_dequantize_of_quantize_is_within_half_a_bin
  caption tokenizer: test_caption_tokenizer_round_trip_and_deterministic_training,
      test_caption_tokenizer_truncates_to_length_and_decode_stops_at_the_first_eos_or_pad,
      test_the_demo_vocabulary_keeps_every_synthetic_caption_whole

3.1 Task sequences and augmentation
  tokens in their task's range, weights:
      test_dataset_tokens_lie_in_task_ranges_and_weights_mark_real_targets
  detection, keypoint, caption, mask targets:
      test_detection_sequence_puts_each_object_in_one_random_slot_and_noise_objects_elsewhere,
      test_keypoint_targets_put_labelled_persons_first_and_unlabelled_points_in_the_box_at_weight_0,
      test_caption_targets_sample_references_in_training_take_the_first_in_evaluation,
      test_training_takes_the_first_captions_as_the_authors_unless_the_preset_samples_them,
      test_mask_target_of_a_filled_box_is_all_fg_and_of_a_left_half_mask_left_half
  geometry: flip, resize, crop: test_flip_twice_is_identity_and_resize_scales_boxes,
      test_resize_size_fits_the_shorter_side_unless_the_longer_exceeds_the_maximum,
      test_boxes_and_keypoints_through_a_crop_away_from_the_origin_a_resize_and_a_flip,
      test_mask_targets_through_a_crop_away_from_the_origin_and_a_flip_by_hand,
      test_mask_targets_sample_the_original_mask_at_sub_pixel_positions,
      test_a_box_cut_by_a_crop_is_clipped_to_the_crop_and_keeps_every_visible_pixel
  augmentation: test_augmentation_is_deterministic_per_epoch_and_index,
      test_the_crop_draws_each_side_as_detr_does_up_to_the_images_own_side,
      test_keypoints_are_pixel_indices_so_a_flip_maps_x_to_w_minus_1_minus_x,
      test_multiscale_augmentation_draws_every_shorter_side_flips_and_crops_half_the_time,
      test_lsj_augmentation_scales_by_0_3_to_2_into_a_fixed_canvas
  every task's targets through augmentation: test_every_task_target_follows_each_augmentation
  non-square images: test_non_square_images_keep_x_and_y_apart_in_targets_and_post_processing

3.3 Architecture
  bidirectional decoder: test_decoder_is_bidirectional_and_sequences_do_not_leak
  folded cross-attention: test_folded_cross_attention_equals_decoding_each_sequence_alone
  attention positions, padding:
      test_attention_adds_positions_to_queries_and_keys_only_and_ignores_padded_memory
  token head:
      test_token_head_scores_cosine_similarity_times_the_learned_temperature_over_the_task_tokens
  sine positions: test_sine_positions_are_normalized_to_the_unpadded_image
  coordinate embeddings: test_coordinate_embeddings_start_more_similar_the_nearer_their_bins
  backbones and their weights: test_backbone_stride_32_map_and_local_weights_round_trip,
      test_vit_b_attends_within_windows_except_in_its_global_blocks_and_loads_torchvision_weights,
      test_torchvision_resnet50_state_dict_loads_every_r50_backbone_tensor,
      test_training_step_with_each_backbone
  parameter count against the authors':
      test_r50_has_the_authors_parameter_count_but_for_three_special_tokens

3.2 Masked training
  masking, copies, strategies: test_masking_hides_exactly_round_ratio_n,
      test_masking_strategies_mask_the_documented_counts
  Hungarian matching: test_matcher_finds_the_known_best_assignment,
      test_matcher_visible_tokens_force_the_match_batched_equals_per_image_and_empty_targets,
      test_matching_cost_is_the_mean_nll_of_five_tokens_per_layer_and_visible_tokens_force_it,
      test_matcher_survives_nan_and_inf_log_probs,
      test_matching_cost_counts_the_class_token_as_well_as_the_box
  losses per task and layer:
      test_masked_nll_sums_the_weighted_cross_entropy_per_layer_and_counts_the_weights,
      test_loss_ignores_logits_of_unmasked_positions,
      test_task_losses_are_the_mean_nll_of_masked_targets_per_layer_and_the_total_weights_them
  caption loss, best reference, cap_full_word:
      test_caption_loss_picks_each_layers_best_reference_by_mean_nll_and_perturbs_one_visible_token,
      test_cap_full_word_shows_one_random_word_in_the_fully_masked_copy_and_trains_the_rest
  AdamW groups: test_adamw_groups_lower_the_backbone_lr_and_spare_normalization_from_weight_decay,
      test_a_run_at_the_paper_presets_learning_rates_keeps_the_backbone_ten_times_lower

3.2 / 4.1 Masked inference and post-processing
  one stage = one pass: test_one_stage_of_masked_inference_is_one_decoder_pass
  keypoint re-masking:
      test_keypoint_stage_2_remasks_coordinates_by_their_keypoints_visibility_confidence
  running mean, halving:
      test_masked_inference_averages_the_logits_of_the_stages_that_re_masked_a_position,
      test_halving_rule_weighs_later_stages_more
  detection score: test_detection_score_classes_takes_the_softmax_over_classes_and_noise_only
  batch independence: test_predictions_of_an_image_do_not_depend_on_its_batch
  post-processing to boxes, masks, keypoints:
      test_post_processing_turns_known_logits_into_boxes_scores_masks_keypoints_and_coco_results
  pasting masks: test_paste_masks_fills_the_box_only,
      test_vectorized_paste_equals_resizing_each_mask_into_its_box
  prediction shapes: test_one_training_step_and_prediction_shapes_for_both_decoders,
      test_r50_default_training_step_and_predict_at_800x1333

Table 2: the autoregressive baseline
  AR inputs and targets:
      test_ar_baseline_trains_on_its_targets_shifted_right_by_one_with_the_objects_first,
      test_ar_detection_sequences_put_each_images_own_objects_first
  causal attention:
      test_causal_self_attention_equals_a_masked_softmax_by_hand_and_drops_only_in_training
  greedy decoding, allowed tokens:
      test_allowed_tokens_per_position_and_greedy_ar_decoding_feeds_back_the_best_allowed_token
  KV cache: test_ar_greedy_decoding_with_kv_cache_equals_without
  end to end: test_ar_baseline_trains_saves_loads_and_evaluates_through_evaluate_py

Data pipeline
  collate: test_collate_pads_to_multiple_of_32_with_pixel_mask,
      test_collate_pads_each_image_to_the_batch_multiple_and_trims_all_padding_rows
  data order over epochs and ranks:
      test_data_order_is_a_seeded_permutation_per_epoch_dealt_over_ranks_and_replicas_stay_identical
  synthetic set: test_synthetic_set_is_valid_coco_and_its_ground_truth_scores_ap_1,
      test_synthetic_set_is_deterministic_and_drawn_where_annotated
  real COCO excerpt: test_real_coco_excerpt_loads_with_sparse_ids_polygons_keypoints_and_captions
  annotations as arrays: test_annotations_are_held_as_arrays_not_one_python_object_per_annotation
  workers end: test_each_epochs_data_workers_end_before_the_checkpoint_and_the_next_epoch

Evaluation
  COCO wrapper = COCOeval:
      test_coco_ap_equals_cocoeval_on_a_hand_built_case_restricted_to_the_evaluated_images
  BLEU-4: test_bleu4_equals_hand_computed_values,
      test_bleu4_clips_each_ngram_by_its_most_frequent_reference_and_takes_the_closest_length
  results writing: test_ground_truth_as_predictions_scores_ap_100_through_the_result_writing_path
  distributed evaluation: test_distributed_evaluation_does_not_depend_on_the_number_of_processes
  own images: test_own_images_give_pictures_and_jsonl_without_annotations
  checkpoint round trip: test_checkpoint_round_trip_gives_identical_predictions
  single task, oracle prompts: test_single_task_runs_train_and_evaluate_only_their_task

Training guarantees
  learning-rate schedule: test_learning_rate_schedule_at_chosen_steps
  clipping: test_gradient_clipping_limits_the_update_to_the_clip_norm
  exact resume, its settings: test_resume_continues_exactly_like_an_uninterrupted_run,
      test_resume_restores_the_runs_settings_and_refuses_a_flag_that_would_change_the_run
  accumulation: test_accumulated_micro_batches_equal_one_batch_k_times_the_size,
      test_accumulation_counts_the_positions_its_random_masks_actually_use
  AMP, fp16: test_amp_on_the_cpu_trains_under_bf16_autocast,
      test_automatic_precision_bf16_where_native_fp16_with_a_grad_scaler_before_and_none_on_the_cpu,
      test_fp16_steps_with_a_grad_scaler_train_skip_an_overflow_and_stop_on_a_non_finite_loss
  GPU settings (faked device):
      test_training_and_evaluation_on_a_gpu_apply_tf32_and_turn_cudnn_attention_off
  crashes, non-finite losses:
      test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable,
      test_non_finite_loss_stops_naming_step_and_task_and_keeps_the_last_checkpoint,
      test_nan_detection_logits_stop_every_rank_cleanly_through_the_matcher
  DDP equivalence, one GPU per process:
      test_ddp_two_processes_equal_one_process_on_the_joined_batch,
      test_one_gpu_per_process_under_cuda_visible_devices
  other process counts, restarts:
      test_resume_on_another_number_of_processes_keeps_the_global_batch_and_the_data_position,
      test_a_restarted_job_continues_from_its_checkpoint_and_ends_like_an_uninterrupted_run
  timeouts: test_no_process_waits_in_a_collective_while_rank_0_scores_and_all_leave_together
  two nodes: test_two_nodes_generate_their_data_share_out_or_say_which_path_is_not_shared
  compile: test_compile_under_ddp_keeps_its_graphs_over_multi_scale_shapes_and_the_replicas_equal
  paper presets, pretrained weights: test_parse_args_presets_schedules_and_explicit_flags,
      test_paper_presets_load_imagenet_weights_by_default_and_offline_say_how_to_go_on
  the README's commands: test_readme_quick_start_then_evaluation_commands_work_in_a_fresh_copy
  the demo's plan: test_the_demo_is_one_fixed_run_on_every_machine_and_repeats_exactly
  overfitting 8 images end to end: test_tiny_model_learns_all_four_tasks_on_eight_images
  bench.py --quick: test_bench_quick_mode_prints_the_tiny_rows

Bad input
  annotation files: test_missing_annotation_file_disables_its_task_with_one_line,
      test_bad_annotation_files_name_the_file_and_field
  images: test_missing_and_corrupt_images_name_the_file_or_are_skipped_and_counted,
      test_skip_bad_images_through_train_py_with_a_data_worker,
      test_grayscale_rgba_palette_and_tiny_images_become_rgb_samples
  degenerate boxes, unlabelled persons:
      test_degenerate_and_out_of_image_boxes_are_clipped_or_dropped_and_counted,
      test_person_with_all_keypoints_unlabelled_trains_no_keypoints
  captions: test_empty_unicode_and_long_captions
  checkpoints: test_truncated_foreign_and_missing_checkpoints_give_clear_errors
  other categories: test_evaluating_on_a_dataset_with_other_categories_is_refused
  missing data: test_missing_coco_root_says_how_to_get_coco_or_use_demo
  annotations checked when read:
      test_annotations_of_the_wrong_type_are_refused_when_read_naming_file_id_and_field,
      test_unusable_masks_are_dropped_and_counted_when_read_and_uncompressed_rle_is_read,
      test_an_rle_is_kept_at_its_non_square_images_size_when_its_runs_cover_the_image,
      test_non_finite_keypoints_are_refused_when_read,
      test_evaluation_refuses_repeated_annotation_ids_before_predicting
  weights-only checkpoints:
      test_a_checkpoint_holding_a_pickled_object_is_refused_and_runs_nothing,
      test_numpy_rng_state_round_trips_through_a_weights_only_checkpoint
  flags: test_impossible_flags_stop_at_once_naming_the_flag_and_its_range_or_choices,
      test_evaluate_py_checks_out_and_its_flags_before_predicting
  evaluate.py's inputs:
      test_evaluate_py_skips_an_unreadable_val_image_when_asked_and_scores_the_rest,
      test_own_images_are_turned_upright_by_exif_and_found_in_sub_folders
  faults: test_a_failed_save_removes_its_temporary_file_and_says_how_much_space_it_needs,
      test_an_unusable_tokenizer_file_stops_a_run_that_trains_captions,
      test_caption_spm_trains_with_the_given_model_and_checks_its_special_ids"""
import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import coco
import data
import evaluate
import mad
import runtime
import train
from mad import MAD, PRESETS, Config, Vocab

# pycocotools + numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
HERE = os.path.dirname(os.path.abspath(__file__))
# real COCO annotations, CC BY 4.0
EXCERPT = os.path.join(HERE, "testdata", "coco_val2017_excerpt")


# =============================================================================
# Shared helpers and fixtures

@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small synthetic COCO set: 24 train and 8 val images of 128 px."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    coco.make_synthetic_coco(root, 24, 8)
    return root


@pytest.fixture(scope="session")
def tokenizer(synth, tmp_path_factory):
    """The caption tokenizer (sentencepiece, 60 pieces) trained on the synthetic set's captions."""
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return mad.CaptionTokenizer(data.train_caption_tokenizer(
        f"{synth}/annotations/captions_train2017.json", prefix, 60))


def tiny_cfg(**over):
    """The tiny preset's Config, with overrides."""
    return Config(**{**PRESETS["tiny"], **over})


def tiny_model(decoder="mad", **over):
    """A random tiny model of decoder "mad" or "ar" (seed 0, no dropout, eval mode, 5 classes)."""
    torch.manual_seed(0)
    cfg = Config(**{**PRESETS["tiny"], "dropout": 0.0, "decoder": decoder, **over})
    vocab = Vocab(num_classes=5, num_bins=cfg.num_bins, num_text=40, person=0)
    return mad.build(cfg, vocab).eval()


def random_batch(model, B=2, size=128, n_gt=3):
    """A random, well-formed batch shaped like collate's, for model (seed 1)."""
    return coco.random_batch(model.cfg, model.vocab, B, size, size, seed=1, n_gt=n_gt)


def spy(monkeypatch, owner, name, record, with_result=False):
    """Replaces owner.name (a module's function, a class's or an object's method) by a wrapper that
    calls the original and returns its result. The wrapper first calls record(*args, **kwargs) or,
    with with_result, calls record(result, *args, **kwargs) after the original."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not with_result:
            record(*args, **kwargs)
        result = original(*args, **kwargs)
        if with_result:
            record(result, *args, **kwargs)
        return result
    monkeypatch.setattr(owner, name, wrapper)


def load_json(path):
    """The JSON file at path (a pathlib.Path)."""
    return json.loads(path.read_text())


def rect(x0, y0, x1, y1):
    """A rectangle as a COCO polygon."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def excerpt_root(tmp_path):
    """The real COCO excerpts as a dataset: an image entry (and a grey picture) for every image
    an annotation refers to, sized to contain its annotations."""
    root = tmp_path / "excerpt"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    files = {k: json.load(open(f"{EXCERPT}/{k}_val2017.json"))
             for k in ("instances", "person_keypoints", "captions")}
    sizes = {}
    for d in files.values():
        for a in d["annotations"]:
            x, y, w, h = a.get("bbox", [0, 0, 1, 1])
            W, H = sizes.get(a["image_id"], (64, 64))
            sizes[a["image_id"]] = (max(W, math.ceil(x + w) + 1), max(H, math.ceil(y + h) + 1))
    images = [dict(id=i, file_name=f"{i:012d}.jpg", width=W, height=H)
              for i, (W, H) in sorted(sizes.items())]
    for im in images:
        Image.new("L", (im["width"], im["height"]), 128).save(root / "val2017" / im["file_name"])
    for k, d in files.items():
        json.dump(dict(d, images=images), open(root / "annotations" / f"{k}_val2017.json", "w"))
    return str(root), files


def save_random_checkpoint(path, ds, tokenizer, **over):
    """Saves a random tiny model (seed 0) over ds's vocabulary as a checkpoint at path; returns
    it."""
    torch.manual_seed(0)
    cfg = tiny_cfg(**over)
    model = MAD(cfg, ds.vocab)
    runtime.save_checkpoint(str(path), dict(
        model=model.state_dict(), config=__import__("dataclasses").asdict(cfg),
        vocab=ds.vocab.state_dict(), spm=tokenizer.model_bytes,
        categories=ds.categories, train=dict(data=ds.root)))
    return model.eval()


def run_args(root, out, *extra):
    """train.py flags of a small CPU run on the synthetic set from random weights: batch 8, 3 steps
    per epoch."""
    return ["--data", root, "--backbone", "tiny", "--no-pretrained", "--out", str(out),
            "--device", "cpu", "--batch-size", "8", "--workers", "0", "--epochs", "2",
            "--lr-drop", "1", "--spm-vocab", "60", "--log-every", "1", *extra]


def run(cmd, timeout=600, check=True, cwd=HERE, **kw):
    """A subprocess from the repository folder; its output is shown when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def torchrun(n, *args):
    """The command line of torch.distributed.run with n local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", *args]


RECORD_ORDER = """
import json, os, sys
sys.path.insert(0, {here!r})
import data, train
getitem, set_epoch = data.CocoMultiTask.__getitem__, data.CocoMultiTask.set_epoch
log = open(os.path.join({out!r}, "order_rank%s.jsonl" % os.environ.get("RANK", "0")), "a")
def recording_getitem(self, index):
    log.write(json.dumps([self.epoch, index]) + "\\n"); log.flush()
    return getitem(self, index)
data.CocoMultiTask.__getitem__ = recording_getitem
train.main(sys.argv[1:])
"""


def recorded_steps(out, rank, per_step):
    """[(epoch, [dataset indices of one optimizer step]), ...] that a rank of a recorded run
    read."""
    rows = [json.loads(l) for l in open(out / f"order_rank{rank}.jsonl")]
    return [(rows[k][0], [i for _, i in rows[k:k + per_step]])
            for k in range(0, len(rows), per_step)]


# =============================================================================
# 3.1 Task tokenization: the shared vocabulary, coordinate bins, the caption tokenizer

def test_vocabulary_layout_by_hand():
    """3.1: one shared vocabulary in a fixed layout; each task's range holds exactly its own tokens.

    3.1 one shared vocabulary: 17 specials, then classes, <noise>, bins + 1 coordinates, <vis>,
    <invis>, <fg>, <bg>, the text pieces; each task's range holds exactly its tokens."""
    v = Vocab(num_classes=5, num_bins=10, num_text=7)
    assert v.det_prompt.tolist() == [0, 1, 2, 3, 4, 5] and (v.seg, v.kpt) == (6, 7)
    assert (v.cap_prompt.tolist() == [8, 9, 10, 11, 12, 13]
            and (v.mask_token, v.start, v.end) == (14, 15, 16))
    assert ((v.cls, v.noise, v.coord, v.vis, v.invis, v.fg, v.bg, v.text, v.size)
            == (17, 22, 23, 34, 35, 36, 37, 38, 45))
    assert {t: v.task_range(t) for t in mad.TASKS} == {"det": (17, 34), "seg": (36, 38),
                                                       "kpt": (23, 36), "cap": (38, 45)}


def test_quantize_floors_into_bins_clamps_and_dequantize_returns_bin_centres():
    """3.1: quantize floors into bins and clamps; dequantize returns the bin centres (by hand).

    3.1 coordinate tokens: token = coord + floor(v * bins) clamped to [0, bins]; back to the bin
    centre (t + 0.5) / bins, clamped to [0, 1] (10 bins, by hand)."""
    v = Vocab(5, 10, 7)
    x = torch.tensor([0.0, 0.05, 0.099, 0.1, 0.55, 0.999, 1.0, -0.3, 1.7])
    assert (v.quantize(x) - v.coord).tolist() == [0, 0, 0, 1, 5, 9, 10, 0, 10]
    t = v.coord + torch.tensor([0, 3, 9, 10])
    assert torch.allclose(v.dequantize(t), torch.tensor([0.05, 0.35, 0.95, 1.0]))


@pytest.mark.parametrize("bins", [7, 128, 500])
def test_dequantize_of_quantize_is_within_half_a_bin(bins):
    """3.1 (property): for every coordinate in [0, 1], dequantize(quantize(v)) lies within half a
    bin of v."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    v = Vocab(3, bins, 0)

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
    def check(values):
        x = torch.tensor(values, dtype=torch.float64)
        assert ((v.dequantize(v.quantize(x)).double() - x).abs() <= 0.5 / bins + 1e-6).all()
    check()


def test_caption_tokenizer_round_trip_and_deterministic_training(synth, tmp_path):
    """3.1: the caption tokenizer trains deterministically, round-trips captions lower-cased, ends
    in eos."""
    path = f"{synth}/annotations/captions_train2017.json"
    a = data.train_caption_tokenizer(path, str(tmp_path / "a"), 60)
    b = data.train_caption_tokenizer(path, str(tmp_path / "b"), 60)
    assert a == b and (tmp_path / "a.model").read_bytes() == a
    tok = mad.CaptionTokenizer(a)
    caps = [c["caption"] for c in json.load(open(path))["annotations"][:20]]
    rows = tok.encode(caps + ["A Red CIRCLE"], 64)
    assert rows.shape == (21, 64)
    for c, r in zip(caps, rows):
        assert tok.decode(r.tolist()) == c.lower()
    assert tok.decode(rows[-1].tolist()) == "a red circle"
    # never crashes; eos always there
    odd = tok.encode(["", "ünïcødé 字 ✓", " ".join(["word"] * 200)], 20)
    assert (odd == tok.eos).any(1).all() and odd[0, 0] == tok.eos


def test_caption_tokenizer_truncates_to_length_and_decode_stops_at_the_first_eos_or_pad(tokenizer):
    """3.1: captions are cut to L - 1 pieces, then eos and pad; decoding stops at the first eos or
    pad.

    3.1 captions: lower-cased pieces, truncated to L - 1 pieces, then eos and pad; decoding stops at
    the first eos or pad, whichever comes first (sentencepiece's own encode/decode as the
    reference)."""
    tok = tokenizer
    long = " ".join(["a red circle"] * 20)
    rows = tok.encode(["A Red Circle", long], 8)
    short = tok.sp.encode("a red circle")
    assert rows[0].tolist() == short + [tok.eos] + [tok.pad] * (7 - len(short))
    assert rows[1].tolist() == tok.sp.encode(long)[:7] + [tok.eos]
    a, b, c = tok.sp.encode("a red circle")[:3]
    assert tok.decode([a, b, tok.pad, c, tok.eos, c]) == tok.sp.decode([a, b])
    assert tok.decode([a, tok.eos, b, tok.pad, c]) == tok.sp.decode([a])
    assert tok.decode([a, b, c]) == tok.sp.decode([a, b, c])


def test_the_demo_vocabulary_keeps_every_synthetic_caption_whole(tmp_path):
    """3.1: with the demo's vocabulary every synthetic caption fits in 20 tokens, about one piece a
    word.

    3.1: captions are padded or truncated to 20 tokens. With the demo's vocabulary size, every
    synthetic caption must fit whole (eos included), in about one piece per word. (sentencepiece
    0.2.3's unigram trainer made 51 nearly single-letter pieces here: 31% of the captions were
    cut.)"""
    coco.make_synthetic_coco(str(tmp_path), 400, 0)
    path = str(tmp_path / "annotations/captions_train2017.json")
    tok = mad.CaptionTokenizer(data.train_caption_tokenizer(path, str(tmp_path / "spm"),
                                                            train.SCHEDULES["tiny"]["spm_vocab"]))
    captions = [a["caption"] for a in json.load(open(path))["annotations"]]
    pieces = [len(ids) for ids in tok.sp.encode([c.lower() for c in captions])]
    assert max(pieces) + 1 <= tiny_cfg().caption_len
    assert sum(pieces) <= 1.2 * sum(len(c.split()) for c in captions)


# =============================================================================
# 3.1 Task sequences and augmentation: data.py's targets, geometry, augmentation

def test_dataset_tokens_lie_in_task_ranges_and_weights_mark_real_targets(synth, tokenizer):
    """3.1: a sample's task sequences hold tokens of their task's range; the weights mark the real
    targets."""
    cfg = tiny_cfg()
    ds = data.CocoMultiTask(synth, "train2017", cfg, tokenizer, train=True)
    v = ds.vocab
    assert (ds.tasks == ("det", "seg", "kpt", "cap")
            and [c["id"] for c in ds.categories] == [1, 3, 5, 8, 11])
    n_persons = n_unlabelled = 0
    for i in range(len(ds)):
        image, t = ds[i]
        n = len(t["boxes"])
        assert image.shape[0] == 3 and tuple(image.shape[1:]) == tuple(t["size"].tolist())
        lo, hi = v.task_range("det")
        assert (t["det_seq"].shape == (cfg.num_queries, 5)
                and ((t["det_seq"] >= lo) & (t["det_seq"] < hi)).all())
        assert (t["det_seq"][:, 4] >= v.cls).all() and (t["det_seq"][:, 4] < v.noise).all()
        for obj in t["det_gt"]:                                  # each object in exactly one slot
            assert (t["det_seq"] == obj).all(1).sum() == 1
        assert (len(t["det_gt"]) == n
                and ((t["det_gt"][:, :4] >= v.coord)
                     & (t["det_gt"][:, :4] <= v.coord + v.num_bins)).all())
        rows = t["seg_weight"].any(1)
        assert rows.sum() == min(n, cfg.max_instances) and not rows[rows.sum():].any()
        assert (((t["seg_seq"] == v.fg) | (t["seg_seq"] == v.bg)).all()
                and (t["seg_prompt"][:, 0] == v.seg).all())
        assert ((t["seg_prompt"][rows, 5] >= v.cls) & (t["seg_prompt"][rows, 5] < v.noise)).all()
        lo, hi = v.task_range("kpt")
        assert (((t["kpt_seq"] >= lo) & (t["kpt_seq"] < hi)).all()
                and (t["kpt_prompt"][:, 0] == v.kpt).all())
        seq, w = t["kpt_seq"].view(-1, 17, 3), t["kpt_weight"].view(-1, 17, 3)
        assert ((seq[..., 2] == v.vis) | (seq[..., 2] == v.invis)).all()
        for p in range(len(seq)):
            if not w[p].any():                                       # padding row
                continue
            n_persons += 1
            box = t["kpt_prompt"][p, 1:5]
            unlabelled = w[p, :, 0] == 0
            n_unlabelled += int(unlabelled.sum())
            assert (seq[p, unlabelled, 2] == v.invis).all()
            x, y = seq[p, unlabelled, 0], seq[p, unlabelled, 1]
            assert ((x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])).all()
        lo, hi = v.task_range("cap")
        assert ((t["cap_seq"] >= lo) & (t["cap_seq"] < hi)).all()
        n_caps = len(ds.ann.captions(i))
        assert (t["cap_weight"].any(1).sum()) == min(n_caps, cfg.max_captions)
    assert n_persons > 3 and n_unlabelled > 3


def test_detection_sequence_puts_each_object_in_one_random_slot_and_noise_objects_elsewhere():
    """3.1: each object takes one random slot of the detection sequence; the other slots hold noise
    objects.

    3.1 detection: Q slots; at most Q objects, each in exactly one slot, at random slots; every
    other slot a noise object: a random box inside the image with x0 <= x1, y0 <= y1 and a random
    real class. Coordinates are normalized by the width (x) and the height (y): 200 x 100 here."""
    cfg = tiny_cfg(num_queries=10, num_bins=100)
    v = Vocab(5, cfg.num_bins, 0, person=0)
    boxes = torch.tensor([[10. * k, 5. * k, 10. * k + 20, 5. * k + 40] for k in range(12)])
    labels = torch.arange(12) % 5
    slots_used, widths = set(), []
    for seed in range(20):
        t = data.detection_targets(boxes, labels, 200, 100,
                                   torch.Generator().manual_seed(seed), v, cfg)
        gt, seq = t["det_gt"], t["det_seq"]
        assert gt.shape == (10, 5) and len({tuple(r) for r in gt.tolist()}) == 10   # 10 of the 12
        expected = {(math.floor(10 * k / 200 * 100), math.floor(5 * k / 100 * 100),
                     math.floor((10 * k + 20) / 200 * 100), math.floor((5 * k + 40) / 100 * 100),
                     k % 5)
                    for k in range(12)}
        assert {(*(r[:4] - v.coord).tolist(), int(r[4] - v.cls)) for r in gt} <= expected
        assert torch.equal(gt[:, :4],
                           v.quantize(t["boxes"] / torch.tensor([200., 100., 200., 100.])))
        is_gt = (seq[:, None] == gt[None]).all(-1).any(-1)
        assert is_gt.sum() == 10 and all((seq == r).all(1).sum() == 1 for r in gt)
        few = data.detection_targets(boxes[:3], labels[:3], 200, 100,
                                     torch.Generator().manual_seed(seed), v, cfg)
        noise = ~(few["det_seq"][:, None] == few["det_gt"][None]).all(-1).any(-1)
        slots_used |= set((~noise).nonzero()[:, 0].tolist())
        ns = few["det_seq"][noise]
        assert noise.sum() == 7 and (ns[:, 0] <= ns[:, 2]).all() and (ns[:, 1] <= ns[:, 3]).all()
        assert ((ns[:, :4] >= v.coord) & (ns[:, :4] <= v.coord + 100)).all()
        assert ((ns[:, 4] >= v.cls) & (ns[:, 4] < v.noise)).all()
        widths += (ns[:, 2] - ns[:, 0]).tolist()
    assert len(slots_used) == 10                  # objects land in every slot over the seeds
    assert 15 < sum(widths) / len(widths) < 50    # noise boxes: corner + a uniform size, clipped


def test_keypoint_targets_put_labelled_persons_first_and_unlabelled_points_in_the_box_at_weight_0():
    """3.1: keypoint targets put labelled persons first; unlabelled keypoints lie in the box,
    weight 0.

    3.1 keypoints: up to S persons, those with a labelled keypoint first; prompt [<kpt>, box,
    person]; a labelled keypoint (v = 1 or 2) gives its coordinates and <vis>; an unlabelled one
    <invis> and coordinates inside the box with weight 0; a person with no labelled keypoint
    weighs 0."""
    cfg = tiny_cfg(max_instances=3, num_bins=100)
    v = Vocab(5, cfg.num_bins, 0, person=2)
    boxes = torch.tensor([[0., 0., 50., 100.], [100., 0., 150., 50.], [60., 10., 90., 90.],
                          [20., 20., 40., 40.]])
    kpts = torch.zeros(4, 17, 3)
    kpts[1, :, 0], kpts[1, :, 1], kpts[1, :, 2] = (torch.linspace(101, 149, 17),
                                                   torch.linspace(1, 49, 17), 2)
    kpts[1, 3, 2], kpts[1, 7, 2] = 1, 0                            # occluded (labelled), unlabelled
    kpts[2, 5] = torch.tensor([70., 40., 2.])                     # one labelled keypoint only
    for seed in range(6):
        t = data.keypoint_targets(boxes, kpts, 200, 100, torch.Generator().manual_seed(seed),
                                  v, cfg)
        prompt, seq, weight = (t["kpt_prompt"], t["kpt_seq"].view(3, 17, 3),
                               t["kpt_weight"].view(3, 17, 3))
        assert (prompt[:, 0] == v.kpt).all() and (prompt[:, 5] == v.cls + 2).all()
        first = {tuple((prompt[r, 1:5] - v.coord).tolist()) for r in (0, 1)}
        assert first == {(50, 0, 75, 50), (30, 10, 45, 90)}   # persons 1 and 2, in either order
        assert not weight[2].any()                            # person 0 or 3: none labelled
        for r in (0, 1):
            k = 1 if prompt[r, 1] - v.coord == 50 else 2
            lab = kpts[k, :, 2] > 0
            assert (weight[r, :, 2].all() and torch.equal(weight[r, :, 0] > 0, lab)
                    and torch.equal(weight[r, :, 1] > 0, lab))
            assert torch.equal(seq[r, :, 2], torch.where(lab, v.vis, v.invis))
            x = torch.floor(kpts[k, :, 0] / 200 * 100).long() + v.coord
            y = torch.floor(kpts[k, :, 1] / 100 * 100).long() + v.coord
            assert torch.equal(seq[r, lab, 0], x[lab]) and torch.equal(seq[r, lab, 1], y[lab])
            b = (boxes[k] / torch.tensor([200., 100., 200., 100.]) * 100).floor().long() + v.coord
            assert ((seq[r, ~lab, 0] >= b[0]) & (seq[r, ~lab, 0] <= b[2])).all()
            assert ((seq[r, ~lab, 1] >= b[1]) & (seq[r, ~lab, 1] <= b[3])).all()


def test_training_takes_the_first_captions_as_the_authors_unless_the_preset_samples_them(
        synth, tokenizer):
    """3.1: the paper presets train on an image's first max_captions references, as the authors'
    code; the tiny preset (sample_captions) draws them at random from its 1-5."""
    assert not Config(**PRESETS["r50"]).sample_captions and PRESETS["tiny"]["sample_captions"]
    ann = coco.CocoAnnotations(synth, "train2017")
    row = max(range(len(ann)), key=lambda i: len(ann.captions(i)))
    captions = ann.captions(row)
    assert len(captions) >= 3
    first = tiny_cfg(sample_captions=False, max_captions=2)
    ds = data.CocoMultiTask(synth, "train2017", first, tokenizer, train=True)
    seq = ds.build(row, ds.load_image(row))[1]["cap_seq"].tolist()
    assert seq == (tokenizer.encode(captions[:2], first.caption_len) + ds.vocab.text).tolist()
    drawn = tiny_cfg(max_captions=2)
    ds = data.CocoMultiTask(synth, "train2017", drawn, tokenizer, train=True)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        seen |= {tuple(r) for r in ds.build(row, ds.load_image(row))[1]["cap_seq"].tolist()}
    assert len(seen) > 2


def test_caption_targets_sample_references_in_training_take_the_first_in_evaluation(tokenizer):
    """3.1: training samples R caption references, evaluation takes the first R; a missing one
    weighs 0.

    3.1 captioning: up to R references per image, encoded with eos and padding (every position
    of a reference is a target, padding included); training samples R of them at random,
    evaluation takes the first R; a missing reference weighs 0."""
    cfg = tiny_cfg(max_captions=3, caption_len=8)
    v = Vocab(5, cfg.num_bins, tokenizer.vocab_size, person=0)
    caps = ["a red circle", "a blue square", "one person", "two shapes"]
    enc = lambda c: (tokenizer.encode([c], 8)[0] + v.text).tolist()
    t = data.caption_targets(caps, random.Random(0), tokenizer, v, cfg, sample=False)
    assert t["cap_seq"].tolist() == [enc(c) for c in caps[:3]] and t["cap_weight"].eq(1).all()
    drawn = set()
    for seed in range(8):
        t = data.caption_targets(caps, random.Random(seed), tokenizer, v, cfg, sample=True)
        rows = t["cap_seq"].tolist()
        assert len({tuple(r) for r in rows}) == 3 and all(r in [enc(c) for c in caps] for r in rows)
        drawn |= {tuple(r) for r in rows}
    assert len(drawn) == 4
    t = data.caption_targets(caps[:2], random.Random(0), tokenizer, v, cfg, sample=True)
    assert t["cap_weight"].sum(1).tolist() == [8, 8, 0]


def flip_t(W, H):
    return data.affine(W, H, (0.0, 0.0, float(W), float(H)), (W, H), flip=True)


def test_mask_target_of_a_filled_box_is_all_fg_and_of_a_left_half_mask_left_half():
    """3.1: mask targets: a box-filling polygon is all <fg>, its left half the left half (flipped:
    right)."""
    H, W = 80, 120
    ident = data.affine(W, H, (0.0, 0.0, float(W), float(H)), (W, H), flip=False)
    full = [[20, 10, 60, 10, 60, 50, 20, 50]]   # polygon filling box (20, 10, 60, 50)
    left = [[20, 10, 40, 10, 40, 50, 20, 50]]   # the left half of it
    box = torch.tensor([[20., 10., 60., 50.]])
    m = data.mask_in_boxes([full, left], box.repeat(2, 1), H, W, ident, 16)
    assert m[0].all()
    assert m[1][:, :8].all() and not m[1][:, 8:].any()
    flip = flip_t(W, H)
    mf = data.mask_in_boxes([left], data.transform_boxes(box, flip)[0], H, W, flip, 16)
    assert mf[0][:, 8:].all() and not mf[0][:, :8].any()               # flipped: right half


def test_flip_twice_is_identity_and_resize_scales_boxes():
    """Geometry: flipping twice is the identity, a flip swaps left and right; a 2x resize doubles
    boxes."""
    W, H = 100, 60
    boxes = torch.tensor([[10., 5., 40., 50.], [0., 0., 100., 60.]])
    # pixel indices 0 .. W - 1
    kpts = torch.rand(2, 17, 3) * torch.tensor([W - 1, H - 1, 0]) + torch.tensor([0, 0, 2.0])
    t = flip_t(W, H)
    b2, _ = data.transform_boxes(data.transform_boxes(boxes, t)[0], t)
    assert torch.allclose(b2, boxes)
    once = data.transform_keypoints(kpts, t)
    assert torch.allclose(once[:, 1, 0], W - 1 - kpts[:, 2, 0])  # left eye <- right eye
    assert torch.allclose(data.transform_keypoints(once, t), kpts, atol=1e-5)
    mask = np.zeros((H, W), np.uint8)
    mask[10:40, 20:26] = mask[34:40, 20:35] = 1                 # an L in box (20, 10, 35, 40)
    rle = __import__("pycocotools.mask", fromlist=["encode"]).encode(np.asfortranarray(mask))
    fb = data.transform_boxes(torch.tensor([[20., 10., 35., 40.]]), t)[0]
    m1 = data.mask_in_boxes([rle], fb, H, W, t, 8)
    m0 = data.mask_in_boxes([rle], torch.tensor([[20., 10., 35., 40.]]), H, W,
                            data.affine(W, H, (0., 0., W, H), (W, H), False), 8)
    assert not torch.equal(m0, m0.flip(-1))                     # a flip shows
    assert torch.equal(m1.flip(-1), m0)                         # flipping the mask twice
    r = data.affine(W, H, (0.0, 0.0, float(W), float(H)), (2 * W, 2 * H), flip=False)
    assert torch.allclose(data.transform_boxes(boxes, r)[0], 2 * boxes)


def test_resize_size_fits_the_shorter_side_unless_the_longer_exceeds_the_maximum():
    """Supplementary A resize: shorter side to `short`, unless the longer side would pass
    max_size."""
    assert data.resize_size(640, 480, 800, 1333) == (1067, 800)
    assert data.resize_size(480, 640, 800, 1333) == (800, 1067)
    assert data.resize_size(1000, 200, 800, 1333) == (1333, 267)          # the longer side caps it
    assert data.resize_size(100, 100, 128, 128) == (128, 128)


def keypoint_flip_by_name():
    """Index each keypoint takes after a horizontal flip, from the COCO names (left <-> right)."""
    names = coco.KEYPOINTS
    swap = lambda n: n.replace("left", "@").replace("right", "left").replace("@", "right")
    return [names.index(swap(n)) for n in names]


def reference_map(t, x, y):
    """Original pixels -> augmented ones from t's crop, output size and flip (not from t's a, b)."""
    cx, cy, cw, ch = t["crop"]
    (ow, oh), flip = t["out_size"], t["flip"]
    x, y = (x - cx) * ow / cw, (y - cy) * oh / ch
    return (ow - x if flip else x), y


def reference_map_pixel(t, x, y):
    """A keypoint's pixel index -> its index after t: the pixel's centre (+0.5) is mapped."""
    ex, ey = reference_map(t, x + 0.5, y + 0.5)
    return ex - 0.5, ey - 0.5


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_and_keypoints_through_a_crop_away_from_the_origin_a_resize_and_a_flip(flip):
    """Supplementary A: boxes and keypoints follow a crop away from the origin, a resize and a flip.

    Augmentation geometry (supplementary A): a crop at (30, 20) of a 200 x 100 image, resized by
    1/2, flipped or not: boxes map, clip to the crop and stay ordered, a box outside is dropped;
    keypoints map, those cut away by the crop become unlabelled, and a flip swaps every left/right
    pair (by name). Values by hand."""
    t = data.affine(200, 100, (30.0, 20.0, 100.0, 60.0), (50, 30), flip)
    boxes = torch.tensor([[40., 30., 80., 70.], [120., 70., 160., 100.], [0., 0., 20., 10.]])
    out, keep = data.transform_boxes(boxes, t)
    assert keep.tolist() == [True, True, False]
    expected = [[5., 5., 25., 25.], [45., 25., 50., 30.]]
    if flip:
        expected = [[25., 5., 45., 25.], [0., 25., 5., 30.]]
    assert torch.allclose(out, torch.tensor(expected))
    i = torch.arange(17, dtype=torch.float32)
    # distinct positions
    kpts = torch.stack([40 + 3 * i, 25 + 2 * i, torch.full((17,), 2.0)], -1)[None]
    kpts[0, 16, :2] = torch.tensor([10.0, 50.0])    # left of the crop
    kpts[0, 3, 2] = 1                               # labelled, occluded
    kpts[0, 5, 2] = 0                               # unlabelled
    got = data.transform_keypoints(kpts, t)[0]
    src = keypoint_flip_by_name() if flip else list(range(17))
    for j in range(17):
        x, y, vis = kpts[0, src[j]].tolist()
        ex, ey = reference_map_pixel(t, x, y)
        inside = 0 <= ex <= 50 and 0 <= ey <= 30
        assert got[j, 2] == (vis if inside else 0), j
        if inside:
            assert torch.allclose(got[j, :2], torch.tensor([ex, ey])), j
    assert got[src.index(16), 2] == 0 and got[src.index(3), 2] == 1


def pycocotools_mask():
    import pycocotools.mask
    return pycocotools.mask


@pytest.mark.parametrize("flip", [False, True])
def test_mask_targets_through_a_crop_away_from_the_origin_and_a_flip_by_hand(flip):
    """3.1: mask targets follow a crop away from the origin and a flip; a box cut by the crop keeps
    its part.

    3.1 segmentation target: the mask inside the box, resampled to M x M from the original mask.
    A 40 x 40 px box on a 200 x 120 image, an L of whole 5-px bins (left 3 columns, bottom 2 rows),
    crop at (30, 10), resize by 1/2, flip or not: the 8 x 8 grid is the L, mirrored when flipped.
    A second box cut by the crop keeps the part inside it: its left 10 px are cut away."""
    H, W = 120, 200
    mask = np.zeros((H, W), np.uint8)
    mask[20:60, 40:55] = 1                                   # left 15 px of box (40, 20, 80, 60)
    mask[50:60, 40:80] = 1                                   # bottom 10 px
    rle = pycocotools_mask().encode(np.asfortranarray(mask))
    t = data.affine(W, H, (30.0, 10.0, 120.0, 100.0), (60, 50), flip)
    box, _ = data.transform_boxes(torch.tensor([[40., 20., 80., 60.]]), t)
    grid = data.mask_in_boxes([rle], box, H, W, t, 8)[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:, :3] = True
    expected[6:, :] = True
    assert torch.equal(grid, expected.flip(-1) if flip else expected)
    # a box (20, 20, 60, 60) whose left 10 px lie left of the crop: the target covers x 30..60 only
    cut = np.zeros((H, W), np.uint8)
    cut[20:60, 45:60] = 1                                    # the right half of what the crop keeps
    box, keep = data.transform_boxes(torch.tensor([[20., 20., 60., 60.]]), t)
    grid = data.mask_in_boxes([pycocotools_mask().encode(np.asfortranarray(cut))], box, H, W,
                              t, 6)[0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:, 3:] = True
    assert keep.all() and torch.equal(grid, expected.flip(-1) if flip else expected)


def grid_by_bilinear_samples(mask, box, M):
    """A reference for mask_in_boxes: each of the M x M cells of `box` (original pixels; pixel i
    covers [i, i + 1)) averages 2 x 2 bilinear samples of the mask at the cell's quarter points,
    and is fg from 0.5 on. Returns (grid, cells within 1e-4 of the threshold)."""
    H, W = mask.shape
    x0, y0, x1, y1 = box
    quarter = (np.arange(2 * M) + 0.5) / (2 * M)
    xs = x0 + quarter * (x1 - x0) - 0.5                    # in pixel-centre coordinates
    ys = y0 + quarter * (y1 - y0) - 0.5

    def weights(v, n):                                     # (len(v), n) bilinear weights
        v = np.clip(v, 0, n - 1)
        lo = np.minimum(np.floor(v).astype(int), n - 2)
        w = np.zeros((len(v), n))
        w[np.arange(len(v)), lo] = 1 - (v - lo)
        w[np.arange(len(v)), lo + 1] = v - lo
        return w
    samples = weights(ys, H) @ mask.astype(np.float64) @ weights(xs, W).T
    cells = samples.reshape(M, 2, M, 2).mean((1, 3))
    return cells >= 0.5, np.abs(cells - 0.5) < 1e-4


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flipped"])
def test_mask_targets_sample_the_original_mask_at_sub_pixel_positions(flip):
    """3.1: a mask target samples the original-resolution mask at the cell centres of its box.

    A slanted polygon in a box with fractional corners on a non-square image, through a crop
    and a resize by 0.7 (and a flip): the 12 x 12 target equals bilinear samples of the original
    mask, 2 x 2 per cell, at the box's own sub-pixel positions (a half-pixel shift, a box
    rounded to whole pixels or a cell read from the wrong side differs in many cells)."""
    H, W = 60, 90
    polygons = [[[21.3, 12.7, 47.9, 15.2, 40.6, 41.4, 24.8, 33.1]],
                [[30.2, 40.1, 38.0, 40.4, 37.5, 47.9, 30.6, 46.0]],    # 0.65 px cells
                [[27.29, 11.74, 30.99, 13.08, 30.83, 15.03, 28.04, 14.58]],  # tiny ones
                [[24.03, 28.38, 40.9, 29.68, 32.74, 31.42, 28.13, 30.17]],
                [[34.93, 27.02, 42.32, 26.53, 38.65, 31.89, 36.52, 31.14]]]
    boxes = [(20.6, 11.9, 48.7, 42.3), (30.2, 40.1, 38.0, 47.9), (27.29, 11.74, 30.99, 15.03),
             (24.03, 28.38, 40.9, 31.42), (34.93, 26.53, 42.32, 31.89)]
    t = data.affine(W, H, (5.0, 3.0, 70.0, 50.0), (49, 35), flip)
    augmented, keep = data.transform_boxes(torch.tensor(boxes), t)
    got = data.mask_in_boxes(polygons, augmented, H, W, t, 12).numpy()
    assert keep.all()
    for polygon, box, grid in zip(polygons, boxes, got):
        mask = data.decode_segmentation(polygon, H, W)
        expected, near = grid_by_bilinear_samples(mask, box, 12)
        expected = expected[:, ::-1] if flip else expected
        near = near[:, ::-1] if flip else near
        assert 10 < expected.sum() < 144 and near.sum() <= 2
        assert (grid == expected)[~near].all()


def test_a_box_cut_by_a_crop_is_clipped_to_the_crop_and_keeps_every_visible_pixel():
    """Augmentation: a box cut by a crop is clipped to the crop and keeps every visible pixel of its
    object.

    Boxes after a crop: we intersect the box with the crop (as DETR); the authors take the
    tight box of the cropped mask. The intersection never cuts a visible pixel of the object (it
    contains the tight box), equals it for an object that fills its box, and is looser when the crop
    cuts an object that does not (here a triangle: its cropped part is narrower than its box)."""
    H, W = 100, 100
    crop = (0.0, 0.0, 50.0, 100.0)                                        # the left half
    t = data.affine(W, H, crop, (50, 100), flip=False)
    for polygon, fills in (([20, 20, 80, 20, 80, 80, 20, 80], True),
                           ([20, 80, 80, 80, 80, 20], False)):
        # what the crop keeps
        mask = torch.from_numpy(data.decode_segmentation([polygon], H, W))[:, :50].bool()
        ys, xs = mask.nonzero(as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        box, keep = data.transform_boxes(torch.tensor([[20., 20., 80., 80.]]), t)
        assert keep.all() and torch.equal(box[0], torch.tensor([20., 20., 50., 80.]))
        # contains the pixels
        assert (box[0, :2] <= tight[:2]).all() and (box[0, 2:] >= tight[2:] - 1).all()
        assert ((box[0] - tight).abs().max() <= 1) == fills   # tight only for the filled box


def test_augmentation_is_deterministic_per_epoch_and_index(synth, tokenizer):
    """Augmentation depends on (epoch, index) only: the same sample twice is equal, another epoch
    differs."""
    ds = data.CocoMultiTask(synth, "train2017", tiny_cfg(), tokenizer, train=True, seed=3)
    a, b = ds[5], ds[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["det_seq"], b[1]["det_seq"])
    ds.set_epoch(1)
    c = ds[5]
    assert a[0].shape != c[0].shape or not torch.equal(a[0], c[0])


def sampled_transforms(cfg, n, W=200, H=120, augment=True):
    return [data.sample_transform(W, H, random.Random(k), cfg, augment) for k in range(n)]


def test_multiscale_augmentation_draws_every_shorter_side_flips_and_crops_half_the_time():
    """Supplementary A: multi-scale augmentation draws every shorter side, flips and crops half the
    time.

    Supplementary A, ResNet / Swin: shorter side in 480..800 step 32 (800 included), longer side
    <= 1333, a horizontal flip half the time, a DETR crop (384..600 after resizing the short side to
    400/500/600) half the time, always inside the image; all lengths scaled by image_size / 800."""
    cfg = tiny_cfg(image_size=800, max_size=1333)
    ts = sampled_transforms(cfg, 400)
    shorts = {min(t["out_size"]) for t in ts if max(t["out_size"]) < 1333}
    assert shorts == set(range(480, 801, 32))
    assert all(max(t["out_size"]) <= 1333 for t in ts)
    flips = sum(t["flip"] for t in ts)
    crops = [t for t in ts if t["crop"] != (0.0, 0.0, 200.0, 120.0)]
    assert 150 < flips < 250 and 150 < len(crops) < 250
    for t in crops:
        x, y, w, h = t["crop"]
        assert x >= 0 and y >= 0 and x + w <= 200 + 1e-6 and y + h <= 120 + 1e-6
        # no distortion
        assert abs(t["out_size"][0] / w - t["out_size"][1] / h) < 0.02 * t["out_size"][0] / w
    # image_size 400: every length / 2
    half = sampled_transforms(tiny_cfg(image_size=400, max_size=1333), 200)
    assert {min(t["out_size"]) for t in half} == set(range(240, 401, 16))


def test_the_crop_draws_each_side_as_detr_does_up_to_the_images_own_side():
    """Supplementary A: the DETR crop draws each side uniformly in [384, min(side, 600)] of the
    image resized to a shorter side of 400, 500 or 600, as DETR's and detectron2's absolute-range
    crop: on a 640 x 480 image a side is never kept whole by a crop, so the full height stays in
    half of the draws (the uncropped half); drawing in [384, 600] and clipping to the side would
    keep it in 72%. Every crop side lies within those bounds at its scale."""
    cfg = Config(**PRESETS["r50"])
    rng = random.Random(0)
    ts = [data.sample_transform(640, 480, rng, cfg, augment=True) for _ in range(4000)]
    full_height = sum(t["crop"][3] == 480 for t in ts) / len(ts)
    assert 0.47 < full_height < 0.53
    crops = [t["crop"] for t in ts if t["crop"] != (0.0, 0.0, 640.0, 480.0)]
    # the resized shorter side 400..600 is 480 * s: a crop side is 384 / s .. min(side, 600 / s)
    assert all(384 * 480 / 600 - 1e-6 <= h < 480 and 384 * 480 / 600 - 1e-6 <= w < 640
               for _, _, w, h in crops)
    heights = [h for _, _, _, h in crops]
    # at s = 400 / 480 the height is drawn in [460.8, 480): a tenth of the crops or so, none above
    assert any(460.8 <= h < 480 for h in heights) and max(heights) < 480


def test_keypoints_are_pixel_indices_so_a_flip_maps_x_to_w_minus_1_minus_x():
    """COCO keypoints are pixel indices (centres at +0.5, as detectron2 reads them): a flip of a
    100-pixel-wide image maps x = 10 to 89 (not 90), and doubling the size maps pixel 10 to
    20.5, the centre of the pixels 20 and 21 it became."""
    kpts = torch.zeros(1, 17, 3)
    kpts[0, :, 0], kpts[0, :, 1], kpts[0, :, 2] = 10.0, 5.0, 2.0
    flip = data.affine(100, 50, (0.0, 0.0, 100.0, 50.0), (100, 50), flip=True)
    out = data.transform_keypoints(kpts, flip)
    assert out[0, :, 0].tolist() == [89.0] * 17 and out[0, :, 1].tolist() == [5.0] * 17
    double = data.affine(100, 50, (0.0, 0.0, 100.0, 50.0), (200, 100), flip=False)
    out = data.transform_keypoints(kpts, double)
    assert out[0, 0, :2].tolist() == [20.5, 10.5]


def test_lsj_augmentation_scales_by_0_3_to_2_into_a_fixed_canvas():
    """Supplementary A: large-scale jitter scales by 0.3 to 2 into a fixed 1024 canvas, flips half
    the time.

    Supplementary A, ViT: large-scale jitter; the image is scaled by s in [0.3, 2.0] x 1024 / its
    longer side, a random crop keeps at most a 1024 canvas of it, flips half the time."""
    cfg = tiny_cfg(scale_jitter="lsj", image_size=1024, max_size=1024)
    W, H = 640, 400
    ts = sampled_transforms(cfg, 300, W, H)
    scales = []
    for t in ts:
        x, y, w, h = t["crop"]
        s = t["out_size"][0] / w
        scales.append(s * max(W, H) / 1024)
        assert abs(t["out_size"][1] / h - s) < 0.01 * s and max(t["out_size"]) <= 1024
        assert 0 <= x and 0 <= y and x + w <= W + 1e-6 and y + h <= H + 1e-6
        assert (w == pytest.approx(min(W, 1024 / s), rel=0.01)
                and h == pytest.approx(min(H, 1024 / s), rel=0.01))
    assert 0.3 <= min(scales) < 0.4 and 1.9 < max(scales) <= 2.0
    assert 100 < sum(t["flip"] for t in ts) < 200
    # test time: resize only
    assert sampled_transforms(cfg, 1, W, H, augment=False)[0]["out_size"] == (1024, 640)


def write_coco(root, images, split="val2017"):
    """A COCO-layout set written from a hand-made description: images = list of dict(W, H,
    objects=[(category_id, polygon)], persons=[(polygon, keypoints (17, 3))], captions=[str])."""
    cats = [dict(id=1, name="person", keypoints=coco.KEYPOINTS, skeleton=coco.SKELETON),
            dict(id=3, name="circle"), dict(id=5, name="square")]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    ims, inst, kps, caps, ann_id = [], [], [], [], 1
    for k, im in enumerate(images, 1):
        ims.append(dict(id=k, file_name=f"{k:06d}.png", width=im["W"], height=im["H"]))
        Image.new("RGB", (im["W"], im["H"]), (100, 120, 140)).save(
            os.path.join(root, split, f"{k:06d}.png"))
        for cid, poly in im.get("objects", []) + [(1, p) for p, _ in im.get("persons", [])]:
            xs, ys = poly[0::2], poly[1::2]
            ann = dict(id=ann_id, image_id=k, category_id=cid, iscrowd=0, segmentation=[poly],
                       area=1.0, bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
            inst.append(ann)
            for p, kp in im.get("persons", []):
                if p is poly:
                    kps.append(dict(ann, keypoints=[float(c) for c in np.asarray(kp).flatten()],
                                    num_keypoints=17))
            ann_id += 1
        for c in im.get("captions", []):
            caps.append(dict(id=ann_id, image_id=k, caption=c))
            ann_id += 1
    for kind, anns, c in (("instances", inst, cats), ("person_keypoints", kps, cats[:1]),
                          ("captions", caps, None)):
        d = dict(images=ims, annotations=anns, **({"categories": c} if c else {}))
        with open(os.path.join(root, "annotations", f"{kind}_{split}.json"), "w") as f:
            json.dump(d, f)
    return root


def person_keypoints(x0, y0, w, h):
    """17 labelled keypoints at distinct positions inside a box; two unlabelled, one occluded."""
    i = np.arange(17)
    kp = np.stack([x0 + (i + 0.5) * w / 17, y0 + h * (0.1 + 0.8 * ((7 * i) % 17) / 17),
                   np.full(17, 2.0)], 1)
    kp[4] = kp[9] = 0
    kp[2, 2] = 1
    return kp


GOLDEN_SET = [dict(W=200, H=120,
                   objects=[(5, [40, 20, 55, 20, 55, 50, 80, 50, 80, 60, 40, 60]),   # an L
                            (3, rect(150, 70, 190, 110))],
                   persons=[(rect(95, 10, 135, 115), person_keypoints(95, 10, 40, 105))],
                   captions=["a square and a person", "one circle", "two shapes and one person",
                             "a person to the right of a square"])]


def expected_targets(ds, t, image_id):
    """The targets of one image under the transform t, computed from the annotations, t's crop,
    output size and flip, and the vocabulary (independently of data.py's geometry)."""
    v, bins = ds.vocab, ds.cfg.num_bins
    ow, oh = t["out_size"]
    # the bin of val / size; either one when float rounding decides
    def q(val, size):
        return {v.coord + min(max(math.floor(val / size * bins + e), 0), bins)
                for e in (-1e-4, 1e-4)}
    anns = [a for a in
            load_json(Path(ds.root) / "annotations/instances_val2017.json")["annotations"]
            if a["image_id"] == image_id]
    boxes = []
    for a in anns:
        x, y, w, h = a["bbox"]
        (xa, ya), (xb, yb) = reference_map(t, x, y), reference_map(t, x + w, y + h)
        x0, x1 = sorted([min(max(xa, 0), ow), min(max(xb, 0), ow)])
        y0, y1 = sorted([min(max(ya, 0), oh), min(max(yb, 0), oh)])
        if x1 > x0 and y1 > y0:
            label = [c["id"] for c in ds.categories].index(a["category_id"])
            boxes.append(([x0, y0, x1, y1], label, a))
    return boxes, q


@pytest.mark.parametrize("mode", ["multiscale", "lsj"])
def test_every_task_target_follows_each_augmentation(tmp_path, tokenizer, mode, monkeypatch):
    """3.1: every task's targets follow each augmentation (multi-scale, LSJ) of a hand-made image.

    3.1 targets after augmentation (flip, crop, multi-scale resize, LSJ): for 16 draws, detection
    tokens are the mapped boxes quantized by the augmented width and height, every object once;
    segmentation prompts name the boxes and their masks follow the mapped mask (90% of cells
    against a nearest-pixel reference: edges differ); keypoints are the mapped labelled keypoints,
    left and right swapped by a flip, cut-away ones unlabelled with weight-0 coordinates."""
    root = write_coco(str(tmp_path / "set"), GOLDEN_SET)
    cfg = tiny_cfg(image_size=160, max_size=266, num_bins=100, max_instances=3, grid_size=8,
                   scale_jitter=mode)
    ds = data.CocoMultiTask(root, "val2017", cfg, tokenizer, train=True)
    v, seen = ds.vocab, []                                                  # every transform drawn
    spy(monkeypatch, data, "sample_transform", lambda t, *a: seen.append(t), with_result=True)
    src_img = np.zeros((120, 200), np.uint8)
    for a in load_json(Path(root) / "annotations/instances_val2017.json")["annotations"]:
        src_img |= data.decode_segmentation(a["segmentation"], 120, 200)
    agree = cells = 0
    for epoch in range(16):
        ds.set_epoch(epoch)
        _, tg = ds[0]
        t = seen[-1]
        ow, oh = t["out_size"]
        assert tuple(tg["size"].tolist()) == (oh, ow)
        boxes, q = expected_targets(ds, t, 1)
        got = sorted(tg["boxes"].tolist())
        assert (len(got) == len(boxes)
                and np.allclose(got, sorted(b for b, _, _ in boxes), atol=1e-3))
        want = {v.cls + label: [q(b[0], ow), q(b[1], oh), q(b[2], ow), q(b[3], oh)]
                for b, label, _ in boxes}
        gt = {row[4]: row[:4] for row in tg["det_gt"].tolist()}   # the labels are distinct here
        assert gt.keys() == want.keys() and all(c in s for k in gt for c, s in zip(gt[k], want[k]))
        for row in tg["det_gt"]:                           # each object in exactly one slot
            assert (tg["det_seq"] == row).all(1).sum() == 1
        for r in range(int(tg["seg_weight"].any(1).sum())):
            prompt = tg["seg_prompt"][r].tolist()
            assert prompt[0] == v.seg and prompt[1:5] == gt[prompt[5]]
            box_row = [w[:4] for w in tg["det_gt"].tolist()].index(prompt[1:5])
            x0, y0, x1, y1 = [float(c) for c in tg["boxes"][box_row]]
            grid = (tg["seg_seq"][r] == v.fg).view(8, 8)
            for i in range(8):
                for j in range(8):
                    u, w_ = x0 + (j + 0.5) * (x1 - x0) / 8, y0 + (i + 0.5) * (y1 - y0) / 8
                    cx, cy, cw, ch = t["crop"]
                    xo = cx + (ow - u if t["flip"] else u) * cw / ow
                    yo = cy + w_ * ch / oh
                    agree += bool(src_img[min(int(yo), 119), min(int(xo), 199)]) == bool(grid[i, j])
                    cells += 1
        kp = torch.tensor(GOLDEN_SET[0]["persons"][0][1], dtype=torch.float32)
        src = keypoint_flip_by_name() if t["flip"] else list(range(17))
        rows = tg["kpt_weight"].view(-1, 17, 3).any(-1).any(-1)
        person = [b for b, label, a in boxes if a["category_id"] == 1]
        assert int(rows.sum()) == len(person)
        if person:
            seq, weight = tg["kpt_seq"].view(-1, 17, 3)[0], tg["kpt_weight"].view(-1, 17, 3)[0]
            for j in range(17):
                x, y, vis = kp[src[j]].tolist()
                ex, ey = reference_map_pixel(t, x, y)
                labelled = vis > 0 and 0 <= ex <= ow and 0 <= ey <= oh
                assert weight[j].tolist() == ([1, 1, 1] if labelled else [0, 0, 1]), (epoch, j)
                assert seq[j, 2] == (v.vis if labelled else v.invis)
                if labelled:
                    assert int(seq[j, 0]) in q(ex, ow) and int(seq[j, 1]) in q(ey, oh), (epoch, j)
    assert (len({s["flip"] for s in seen}) == 2 and cells > 500
            and agree / cells > 0.9), agree / cells


@pytest.mark.parametrize("aspect", [1.5, 0.6])
def test_non_square_images_keep_x_and_y_apart_in_targets_and_post_processing(tmp_path, aspect):
    """3.1: non-square images keep x (width) and y (height) apart in targets and post-processing.

    3.1: coordinates are normalized by the image's width (x) and height (y) before they are
    quantized, and post-processing scales x by the original width and y by the height: on a
    non-square image every box and keypoint target decodes to within one bin of its annotation,
    in the resized image (dataset) and in the original one (mad.to_pixels)."""
    root = tmp_path / "set"
    coco.make_synthetic_coco(str(root), 1, 6, aspect=aspect)
    cfg = tiny_cfg()
    # the fixed evaluation resize
    ds = data.CocoMultiTask(str(root), "val2017", cfg, None, train=False)
    v = ds.vocab
    files = {k: load_json(root / f"annotations/{k}_val2017.json")
            for k in ("instances", "person_keypoints")}
    n_boxes = n_keypoints = 0
    for i in range(len(ds)):
        _, t = ds[i]
        (H, W), (h, w) = t["orig_size"].tolist(), t["size"].tolist()
        assert (W, H) == (round(128 * aspect), 128) and w != h
        resized_bin, orig_bin = torch.tensor([w, h]) / v.num_bins, torch.tensor([W, H]) / v.num_bins
        # detection: tokens -> resized pixels, against the target boxes
        xy = v.dequantize(t["det_gt"][:, :4]).view(-1, 2, 2) * torch.tensor([w, h])
        assert ((xy - t["boxes"].view(-1, 2, 2)).abs() <= resized_bin).all()
        # ... and through post-processing to original pixels, against the annotated boxes
        px = mad.to_pixels(t["det_gt"][None, :, :4], t["orig_size"][None], v)[0].view(-1, 2, 2)
        annotated = torch.tensor([[x, y, x + bw, y + bh] for a in files["instances"]["annotations"]
                                  if a["image_id"] == t["image_id"]
                                  for x, y, bw, bh in [a["bbox"]]]).view(-1, 2, 2)
        assert len(px) == len(annotated) > 0
        for box in px:                                        # each decoded box has its annotation
            assert ((box - annotated).abs() <= orig_bin).all(-1).all(-1).any(), (box, annotated)
        n_boxes += len(px)
        # keypoints: labelled x, y tokens against the annotation of the person their prompt names
        persons = [a for a in files["person_keypoints"]["annotations"]
                   if a["image_id"] == t["image_id"]]
        seq, weight = t["kpt_seq"].view(-1, 17, 3), t["kpt_weight"].view(-1, 17, 3)
        for p in range(len(seq)):
            if not weight[p].any():
                continue
            prompt = v.dequantize(t["kpt_prompt"][p, 1:5]).view(2, 2) * torch.tensor([w, h])
            boxes = torch.tensor([[x, y, x + bw, y + bh]
                                  for x, y, bw, bh in (a["bbox"] for a in persons)])
            boxes = boxes.view(-1, 2, 2) * torch.tensor([w / W, h / H])
            near = ((prompt - boxes).abs() <= resized_bin).all(-1).all(-1)
            assert near.sum() == 1, (prompt, boxes)                  # the prompt names one person
            kp = torch.tensor(persons[int(near.nonzero()[0, 0])]["keypoints"],
                              dtype=torch.float32).view(17, 3)
            labelled = weight[p, :, 0] == 1
            assert torch.equal(labelled, kp[:, 2] > 0)
            tokens = seq[p, labelled, :2]                            # (k, 2) x, y tokens
            assert ((v.dequantize(tokens) * torch.tensor([w, h])
                     - kp[labelled, :2] * torch.tensor([w / W, h / H])).abs()
                    <= resized_bin).all()
            px = mad.to_pixels(tokens.flatten()[None, None], t["orig_size"][None], v).view(-1, 2)
            assert ((px - kp[labelled, :2]).abs() <= orig_bin).all()
            n_keypoints += int(labelled.sum())
    assert n_boxes > 5 and n_keypoints > 10


# =============================================================================
# 3.3 Architecture: the bidirectional decoder, attention, token head, embeddings, backbones

def test_decoder_is_bidirectional_and_sequences_do_not_leak():
    """3.3: the decoder is bidirectional (the first position sees the last); sequences do not
    mix."""
    model = tiny_model()
    batch = random_batch(model)
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["padding"])
        tokens = torch.randint(0, model.vocab.size, (2, 3, 30))
        base = model.decode(tokens, enc)                              # (B, n, L, d)
        last = tokens.clone()
        last[0, 1, -1] = (last[0, 1, -1] + 1) % model.vocab.size      # only the last token of seq 1
        changed = model.decode(last, enc)
        other = tokens.clone()
        other[0, 2] = torch.randint(0, model.vocab.size, (30,))       # another sequence, same image
        leaked = model.decode(other, enc)
    assert (changed[0, 1, 0] - base[0, 1, 0]).abs().max() > 1e-4      # first position sees the last
    assert torch.allclose(leaked[0, :2], base[0, :2], atol=1e-6)      # seqs 0, 1 unchanged


def test_folded_cross_attention_equals_decoding_each_sequence_alone():
    """3.3: decoding an image's sequences folded together equals decoding each sequence alone."""
    model = tiny_model()
    batch = random_batch(model)
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["padding"])
        tokens = torch.randint(0, model.vocab.size, (2, 4, 26))
        together = model.decode(tokens, enc)
        alone = torch.stack([model.decode(tokens[:, i:i + 1], enc)[:, 0] for i in range(4)], 1)
    assert torch.allclose(together, alone, atol=1e-5)


def test_attention_adds_positions_to_queries_and_keys_only_and_ignores_padded_memory():
    """3.3: positions are added to queries and keys only; cross-attention ignores padded memory.

    3.3 (as DETR): positions go to the queries and keys, never to the values; cross-attention
    attends to the unpadded image tokens only. With every query and key projection zeroed, attention
    is uniform: a layer's output then cannot depend on the positions, and cross-attention returns
    the mean of the values of the unpadded memory tokens (by hand)."""
    torch.manual_seed(0)
    d = 16
    layer = mad.DecoderLayer(d, 2, 32, 0.0).eval()
    enc_layer = mad.EncoderLayer(d, 2, 32, 0.0).eval()
    with torch.no_grad():
        for attn in (layer.self_attn, layer.cross_attn, enc_layer.attn):
            for lin in (attn.q, attn.k):
                lin.weight.zero_(); lin.bias.zero_()
    x, memory = torch.randn(2, 5, d), torch.randn(1, 7, d)
    attend = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    attend[..., 5:] = False                                 # the last 2 tokens are padding
    with torch.no_grad():
        a = layer(x, torch.randn(5, d), mad.Memory(memory, memory + torch.randn(1, 7, d), attend))
        b = layer(x, torch.randn(5, d), mad.Memory(memory, memory + torch.randn(1, 7, d), attend))
        assert torch.allclose(a, b, atol=1e-5)
        e1 = enc_layer(memory, torch.randn(1, 7, d), attend)
        e2 = enc_layer(memory, torch.randn(1, 7, d), attend)
        assert torch.allclose(e1, e2, atol=1e-5)
        changed = memory.clone()
        changed[:, 5:] += 100.0                             # padding tokens: no effect
        assert torch.allclose(layer(x, torch.zeros(5, d), mad.Memory(changed, changed, attend)),
                              layer(x, torch.zeros(5, d), mad.Memory(memory, memory, attend)),
                              atol=1e-5)
        cross = layer.cross_attn(torch.randn(1, 10, d), memory, memory, attend)
        mean_value = layer.cross_attn.out(layer.cross_attn.v(memory[:, :5]).mean(1))
        assert torch.allclose(cross, mean_value.expand(1, 10, d), atol=1e-5)


def test_token_head_scores_cosine_similarity_times_the_learned_temperature_over_the_task_tokens():
    """3.3: the token head scores exp(s) x cosine(MLP(h), embedding) over the task's own tokens.

    3.3 token head: the logit of a token is exp(s) x cos(MLP(h), its embedding), over the task's own
    tokens only: a token whose embedding points along MLP(h) scores exactly exp(s), the most any
    can, and scaling MLP(h) changes nothing."""
    model = tiny_model()
    v = model.vocab
    h = torch.randn(3, model.cfg.d_model)
    with torch.no_grad():
        z = model.head(h)
        lo, hi = v.task_range("kpt")
        model.embed.weight[lo + 4] = z[1] * 3.0             # along the head's output for h[1]
        out = model.logits(h, "kpt")
        scale = model.logit_scale.exp()
        assert out.shape == (3, hi - lo) and (out.abs() <= scale + 1e-4).all()
        assert out[1, 4] == pytest.approx(scale.item(), rel=1e-5) and out[1].argmax() == 4
        model.head[-1].weight.mul_(7.0); model.head[-1].bias.mul_(7.0)
        assert torch.allclose(model.logits(h, "kpt"), out, atol=1e-4)
        model.logit_scale.fill_(math.log(2.0))
        assert torch.allclose(model.logits(h, "kpt"), out / scale * 2.0, atol=1e-4)


def test_sine_positions_are_normalized_to_the_unpadded_image():
    """3.3: sine image positions are normalized to the unpadded image (as DETR; by hand).

    3.3 image positions (as DETR): y and x are cumulative counts over the unpadded pixels scaled to
    (0, 2 pi], encoded as sin and cos at frequencies 10000^(4k/d); the valid region of a padded
    image gets the codes of the same image unpadded (2 x 3 tokens padded to 3 x 5 here; d = 8, by
    hand)."""
    pad = torch.ones(1, 3, 5, dtype=torch.bool)
    pad[:, :2, :3] = False
    got = mad.sine_positions(pad, 8).view(3, 5, 8)
    alone = mad.sine_positions(torch.zeros(1, 2, 3, dtype=torch.bool), 8).view(2, 3, 8)
    assert torch.allclose(got[:2, :3], alone, atol=1e-6)
    for i in range(2):
        for j in range(3):
            y, x = 2 * math.pi * (i + 1) / 2, 2 * math.pi * (j + 1) / 3
            want = [math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100),
                    math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100)]
            assert np.allclose(alone[i, j].tolist(), want, atol=1e-5), (i, j)


def test_coordinate_embeddings_start_more_similar_the_nearer_their_bins():
    """3.3: coordinate embeddings start as sine codes, more similar the nearer their bins (off:
    random)."""
    cfg = tiny_cfg()
    vocab = Vocab(5, cfg.num_bins, 10)
    coords = MAD(cfg, vocab).embed.weight[vocab.coord:vocab.vis].detach()     # (bins + 1, d)
    assert torch.equal(coords, mad.coordinate_embeddings(cfg.num_bins, cfg.d_model))
    e = torch.nn.functional.normalize(coords, dim=-1)
    sim = e[64] @ e.t()                                                   # bin 64 against every bin
    near_to_far = sim[[64, 65, 66, 68, 72, 80]]
    assert (near_to_far.diff() < 0).all() and sim[65] > 0.8 and sim[128] < 0.2
    # the scale of an N(0, 1) row
    assert torch.allclose(coords.norm(dim=1), torch.tensor(cfg.d_model ** 0.5))
    off = MAD(tiny_cfg(sine_coords=False), vocab).embed.weight[vocab.coord:vocab.vis].detach()
    assert not torch.allclose(off, coords)


@pytest.mark.parametrize("name,channels", [("tiny", 256), ("r50", 2048), ("swin_b", 1024),
                                           ("swin_b384", 1024), ("vit_b", 256)])
def test_backbone_stride_32_map_and_local_weights_round_trip(name, channels, tmp_path):
    """3.3: each backbone gives a stride-32 map of its channels; its weights round-trip through a
    file."""
    torch.manual_seed(0)
    backbone, c = mad.BACKBONES[name]()
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        y = backbone.eval()(x)
    assert c == channels and y.shape == (1, channels, 4, 6)
    if name == "tiny":
        return
    torch.save(backbone.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    other, _ = mad.BACKBONES[name]()
    runtime.load_backbone_weights(other, name, str(tmp_path / "w.pt"))
    with torch.no_grad():
        assert torch.equal(other.eval()(x), y)


def test_vit_b_attends_within_windows_except_in_its_global_blocks_and_loads_torchvision_weights(
        tmp_path):
    """Supplementary A: ViT-B attends within windows except in its global blocks; torchvision
    weights load.

    Supplementary A (ViTDet): blocks 2, 5, 8, 11 attend globally, the others within 14 x 14 windows:
    a change in one window reaches another only through a global block. The backbone keeps
    torchvision's ViT-B/16 layout, so its weights load (the pyramid neck is new); our swin_b is
    torchvision's swin_b, parameter for parameter."""
    import torchvision
    torch.manual_seed(0)
    vit = mad.ViTDetB().eval()
    assert vit.global_blocks == {2, 5, 8, 11} and vit.window == 14
    x = torch.randn(1, 28, 28, 768)                         # 2 x 2 windows of 14 x 14
    y = x.clone()
    y[0, 0, 0] += 1.0                                       # a change in the top-left window
    with torch.no_grad():
        local = [vit.windowed(vit.encoder.layers[0], t, torch.nn.Identity()) for t in (x, y)]
        full = [mad.vit_block(vit.encoder.layers[2], t.flatten(1, 2),
                              torch.nn.Identity()).view(1, 28, 28, 768) for t in (x, y)]
    # its own window changes; another window does not; through a global block it does
    assert not torch.equal(local[0][0, :14, :14], local[1][0, :14, :14])
    assert torch.equal(local[0][0, 14:, 14:], local[1][0, 14:, 14:])
    assert not torch.allclose(full[0][0, 14:, 14:], full[1][0, 14:, 14:])
    torch.save(torchvision.models.vit_b_16().state_dict(), tmp_path / "vit.pt")
    runtime.load_backbone_weights(vit, "vit_b", str(tmp_path / "vit.pt"))
    assert torch.equal(
        vit.encoder.layers[5].mlp[0].weight,
        torch.load(tmp_path / "vit.pt")["encoder.layers.encoder_layer_5.mlp.0.weight"])
    swin, ours = torchvision.models.swin_b().state_dict(), mad.SwinB().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in swin.items()
                                                     if not k.startswith("head.")}


def test_r50_has_the_authors_parameter_count_but_for_three_special_tokens():
    """At the authors' vocabulary (80 classes, 500 bins, 11,421 caption pieces) the r50 model has
    44,682,177 parameters; the authors' config gives 44,682,945. The 768 between them, token by
    token: their vocabulary reserves 20 ids before the classes where this one has 17 specials,
    3 embedding rows of 256 more. Both have 6 + 500 = 506 sequence positions."""
    v = Vocab(80, 500, 11421, person=0)
    model = mad.build(Config(**PRESETS["r50"]), v)
    count = sum(p.numel() for p in model.parameters())
    assert count == 44_682_177
    assert v.cls == 17 and v.size == 17 + 80 + 1 + 501 + 4 + 11421
    assert model.seq_pos.shape == (506, 256)
    authors_vocab = 20 + 80 + 501 + 4 + 11421 + 1
    assert authors_vocab - v.size == 3
    assert count + 256 * (authors_vocab - v.size) == 44_682_945


def test_torchvision_resnet50_state_dict_loads_every_r50_backbone_tensor(tmp_path):
    """README: a torchvision resnet50 state dict as --backbone-weights loads every r50 backbone
    tensor.

    README, offline weights: a state dict saved from torchvision's resnet50 (its key layout, fc.*
    and BatchNorm's num_batches_tracked included), passed as --backbone-weights, loads every tensor
    of the r50 backbone; the classifier is ignored."""
    import torchvision
    torch.manual_seed(1)
    # random: no tensor equals its init
    saved = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in torchvision.models.resnet50().state_dict().items()}
    torch.save(saved, tmp_path / "r50.pt")
    assert (train.parse_args(["--backbone", "r50",
                              "--backbone-weights", str(tmp_path / "r50.pt")])[1].backbone_weights
            == str(tmp_path / "r50.pt"))
    torch.manual_seed(0)
    backbone, _ = mad.BACKBONES["r50"]()
    runtime.load_backbone_weights(backbone, "r50", str(tmp_path / "r50.pt"))
    own = backbone.state_dict()
    assert set(own) == {k for k in saved
                        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    for k in own:
        assert torch.equal(own[k], saved[k]), k
    assert torch.equal(backbone.layer4[2].conv3.weight, saved["layer4.2.conv3.weight"])
    assert torch.equal(backbone.bn1.running_var, saved["bn1.running_var"])


@pytest.mark.parametrize("name", ["r50", "swin_b", "vit_b"])
def test_training_step_with_each_backbone(name):
    """3.3: with each paper backbone a training step gives a finite loss and gradients in the
    backbone.

    The full model (paper widths) with each backbone, one step at a reduced image size."""
    torch.manual_seed(0)
    cfg = Config(**{**PRESETS[name], "num_queries": 20, "dropout": 0.0})
    model = MAD(cfg, Vocab(num_classes=80, num_bins=cfg.num_bins, num_text=100, person=0)).train()
    batch = random_batch(model, B=1, size=160)
    loss, parts = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-4:])


# =============================================================================
# 3.2 Masked training: masking, Hungarian matching, the losses, the optimizer's groups

def test_masking_hides_exactly_round_ratio_n():
    """3.2: random masking hides exactly round(0.7 L) tokens of each sequence, in another draw
    elsewhere."""
    for L in (5, 20, 57, 262, 500):
        m = mad.random_mask((4, 3, L), 0.7, "cpu")
        assert (m.sum(-1) == round(0.7 * L)).all()
    assert not torch.equal(mad.random_mask((1, 1, 500), 0.7, "cpu"),
                           mad.random_mask((1, 1, 500), 0.7, "cpu"))


@pytest.mark.parametrize("strategy", ["fixed", "random", "multiple"])
def test_masking_strategies_mask_the_documented_counts(strategy):
    """Table 3: the fixed, random and multiple masking strategies mask the documented counts per
    copy.

    Table 3: one partly masked copy hiding round(0.7 L) tokens of each sequence (fixed); one whose
    ratio is drawn per sequence from [0.6, 0.8] (random); or two copies hiding round(0.6 L) and
    round(0.8 L) (multiple). The fully masked copy comes first in every case, and every task's loss
    runs with the extra copy."""
    model = tiny_model(mask_strategy=strategy)
    seqs = torch.randint(model.vocab.coord, model.vocab.vis, (4, 6, 57))
    inputs, masked, src = mad.masked_copies(seqs, model.partial_masks, model.vocab.mask_token)
    copies = 3 if strategy == "multiple" else 2
    assert inputs.shape == masked.shape == (4, copies * 6, 57) and masked[:, :6].all()
    assert (torch.equal(inputs[~masked], seqs.repeat(1, copies, 1)[~masked])
            and (inputs[masked] == model.vocab.mask_token).all())
    counts = masked[:, 6:].sum(-1)                                    # (4, (copies - 1) * 6)
    if strategy == "fixed":
        assert (counts == round(0.7 * 57)).all()
    elif strategy == "random":
        assert (((counts >= round(0.6 * 57)) & (counts <= round(0.8 * 57))).all()
                and len(counts.unique()) > 3)
    else:
        assert (counts[:, :6] == round(0.6 * 57)).all() and (counts[:, 6:] == round(0.8 * 57)).all()
    assert torch.equal(src, torch.arange(6).repeat(copies))
    loss, parts = model.train().loss(random_batch(model))
    assert torch.isfinite(loss) and set(parts) == set(mad.TASKS)


def det_logp(v, Q, B=1, layers=1, c=1):
    """Uniform log-probs over the detection range, shaped (layers, B, c, 5Q, V)."""
    lo, hi = v.task_range("det")
    return torch.full((layers, B, c, 5 * Q, hi - lo), -math.log(hi - lo))


def test_matcher_finds_the_known_best_assignment():
    """3.2: Hungarian matching finds the known best assignment; unmatched slots learn <noise> and no
    box."""
    v = Vocab(5, 50, 10)
    Q, lo = 6, v.task_range("det")[0]
    gt = torch.tensor([[v.coord + 1, v.coord + 2, v.coord + 3, v.coord + 4, v.cls + 0],
                       [v.coord + 10, v.coord + 11, v.coord + 12, v.coord + 13, v.cls + 3]])
    logp = det_logp(v, Q)
    best = {4: 0, 1: 1}                                                      # slot -> object
    for slot, obj in best.items():
        for j in range(5):
            logp[0, 0, 0, slot * 5 + j, gt[obj, j] - lo] = 0.0              # certain of that object
    masked = torch.ones(1, 1, 5 * Q, dtype=torch.bool)
    inputs = torch.full((1, 1, 5 * Q), v.mask_token)
    target, weight = mad.match_detections(logp, inputs, masked, [gt], v)
    target, weight = target.view(Q, 5), weight.view(Q, 5)
    for slot, obj in best.items():
        assert (target[slot] == gt[obj] - lo).all() and (weight[slot] == 1).all()
    for slot in set(range(Q)) - set(best):                                   # unmatched -> <noise>
        assert target[slot, 4] == v.noise - lo
        assert (weight[slot, :4] == 0).all() and weight[slot, 4] == 1


def test_matching_cost_counts_the_class_token_as_well_as_the_box():
    """3.2: the class token is one of the 5 in the matching cost. Two objects whose boxes differ
    in one coordinate: by the boxes alone slot 0 would take object 0, but slot 0 is certain of
    object 1's class and slot 1 of object 0's, which outweighs it (cost 1.03 each against 5.12)."""
    v = Vocab(5, 50, 10)
    Q, lo = 2, v.task_range("det")[0]
    c = v.coord
    gt = torch.tensor([[c + 1, c + 2, c + 3, c + 4, v.cls + 1],
                       [c + 1, c + 2, c + 3, c + 5, v.cls + 3]])
    logp = det_logp(v, Q)
    for slot, (near, far, own_class, other_class) in enumerate(
            [(c + 4, c + 5, v.cls + 3, v.cls + 1), (c + 5, c + 4, v.cls + 1, v.cls + 3)]):
        row = logp[0, 0, 0, slot * 5: slot * 5 + 5]
        row[:3] = -30.0
        row[0, c + 1 - lo] = row[1, c + 2 - lo] = row[2, c + 3 - lo] = 0.0
        row[3] = -30.0
        row[3, near - lo], row[3, far - lo] = math.log(0.6), math.log(0.4)
        row[4] = -30.0
        row[4, own_class - lo], row[4, other_class - lo] = math.log(0.9), math.log(0.01)
    masked = torch.ones(1, 1, 5 * Q, dtype=torch.bool)
    inputs = torch.full((1, 1, 5 * Q), v.mask_token)
    target, _ = mad.match_detections(logp, inputs, masked, [gt], v)
    target = target.view(Q, 5)
    assert (target[0] == gt[1] - lo).all() and (target[1] == gt[0] - lo).all()


def test_matcher_visible_tokens_force_the_match_batched_equals_per_image_and_empty_targets():
    """3.2: visible tokens force the match; batched matching equals per image; no objects: all
    <noise>."""
    v = Vocab(5, 50, 10)
    Q, lo = 5, v.task_range("det")[0]
    g = torch.Generator().manual_seed(0)
    gts = [torch.cat([torch.randint(v.coord, v.coord + 51, (n, 4), generator=g),
                      torch.randint(v.cls, v.noise, (n, 1), generator=g)], 1) for n in (3, 0, 2)]
    logp = torch.randn(2, 3, 2, 5 * Q, v.vis - lo, generator=g).log_softmax(-1)
    masked = torch.rand(3, 2, 5 * Q, generator=g) < 0.7
    masked[:, 0] = True                                                 # copy 0 fully masked
    inputs = torch.where(masked, v.mask_token,
                         torch.randint(v.cls, v.vis, (3, 2, 5 * Q), generator=g))
    inputs[0, 1, 15:20] = gts[0][1]                                     # slot 3 shows object 1 ...
    masked[0, 1, 15:20] = torch.tensor([False, True, False, True, False])  # ... partly visible
    target, weight = mad.match_detections(logp, inputs, masked, gts, v)
    assert (target[:, 0, 1, 15:20] == gts[0][1] - lo).all()             # in every layer
    for b in range(3):                                                  # batched == per image
        t1, w1 = mad.match_detections(logp[:, b:b + 1], inputs[b:b + 1], masked[b:b + 1],
                                      gts[b:b + 1], v)
        assert torch.equal(t1[:, 0], target[:, b]) and torch.equal(w1[:, 0], weight[:, b])
    assert (weight[:, 1].view(2, 2, Q, 5)[..., :4] == 0).all()          # no objects: all <noise>
    assert (target[:, 1].view(2, 2, Q, 5)[..., 4] == v.noise - lo).all()
    assert (weight[:, 0].view(2, 2, Q, 5)[..., 0].sum(-1) == 3).all()   # every object matched once


def test_matching_cost_is_the_mean_nll_of_five_tokens_per_layer_and_visible_tokens_force_it():
    """3.2: the matching cost is each layer's mean NLL of an object's 5 tokens, visible tokens
    forced.

    3.2 Hungarian matching, per layer: cost(slot, object) = mean over its 5 tokens of -log p, so
    a slot sure of the class but far off in its box loses to one close in the box; at a visible
    position the prediction is the visible token (0 if it is the object's, else a large cost).
    Layer 0 and layer 1 predict differently and are matched differently."""
    v = Vocab(3, 20, 0)
    lo = v.task_range("det")[0]
    V = v.task_range("det")[1] - lo
    obj = torch.tensor([[v.coord + 2, v.coord + 4, v.coord + 6, v.coord + 8, v.cls + 1]])
    logp = torch.full((2, 1, 1, 10, V), -5.0)                       # 2 layers, 2 slots
    # layer 0: slot 0 sure of the class (-0.1) but 4 box tokens at -4; slot 1 box at -1, class at -4
    logp[0, 0, 0, 4, obj[0, 4] - lo] = -0.1
    logp[0, 0, 0, :4].scatter_(-1, (obj[0, :4] - lo)[:, None], -4.0)
    logp[0, 0, 0, 5:9].scatter_(-1, (obj[0, :4] - lo)[:, None], -1.0)
    logp[0, 0, 0, 9, obj[0, 4] - lo] = -4.0
    # layer 1: the slots swapped
    logp[1] = logp[0].view(1, 1, 2, 5, V).flip(2).view(1, 1, 10, V)
    masked = torch.ones(1, 1, 10, dtype=torch.bool)
    target, weight = mad.match_detections(logp, torch.full((1, 1, 10), v.mask_token), masked,
                                          [obj], v)
    matched = weight.view(2, 2, 5)[..., 0] == 1                     # (layers, slots)
    # mean: 3.22 > 1.6 in layer 0
    assert matched.tolist() == [[False, True], [True, False]]
    # a visible wrong token forces the cost: slot 1 shows another x0 at a visible position
    inputs = torch.full((1, 1, 10), v.mask_token)
    inputs[0, 0, 5], masked[0, 0, 5] = v.coord + 3, False
    target, weight = mad.match_detections(logp, inputs, masked, [obj], v)
    assert (weight.view(2, 2, 5)[..., 0] == 1).tolist() == [[True, False], [True, False]]
    inputs[0, 0, 5] = obj[0, 0]                                     # the object's own token: cost 0
    logp[1, 0, 0, 5:10] = -3.0
    target, weight = mad.match_detections(logp, inputs, masked, [obj], v)
    assert (weight.view(2, 2, 5)[..., 0] == 1).tolist() == [[False, True], [True, False]]
    assert (target.view(2, 2, 5)[weight.view(2, 2, 5)[..., 0] == 1] == obj - lo).all()


def test_matcher_survives_nan_and_inf_log_probs():
    """3.2: NaN and -inf log-probs still give a valid assignment; the NaN reaches the loss.

    Under bf16 a NaN could reach scipy's linear_sum_assignment, which then raised instead of
    letting the non-finite loss stop training. NaN rows and -inf log-probs (+inf costs) must give
    a valid assignment; the NaN still reaches the loss through the log-probs."""
    v = Vocab(5, 50, 10)
    Q, lo = 4, v.task_range("det")[0]
    gt = torch.tensor([[v.coord + 1, v.coord + 2, v.coord + 3, v.coord + 4, v.cls + 1],
                       [v.coord + 7, v.coord + 8, v.coord + 9, v.coord + 9, v.cls + 2]])
    logp = det_logp(v, Q, layers=2)
    logp[0, ..., 3:8, :] = float("nan")                         # slot 0 and 1 rows
    logp[1, ..., :, gt[0, 4] - lo] = float("-inf")              # an impossible class
    masked = torch.ones(1, 1, 5 * Q, dtype=torch.bool)
    target, weight = mad.match_detections(logp, torch.full((1, 1, 5 * Q), v.mask_token), masked,
                                          [gt], v)
    for layer in range(2):
        matched = weight[layer, 0, 0].view(Q, 5)[:, 0] == 1
        assert matched.sum() == 2                               # both objects, once each
        rows = target[layer, 0, 0].view(Q, 5)[matched]
        assert sorted(rows[:, 4].tolist()) == sorted((gt[:, 4] - lo).tolist())
    loss, _ = mad.masked_nll(logp, target, weight * masked)
    assert torch.isnan(loss[0]) and torch.isinf(loss[1])        # the training loop stops on these


def test_masked_nll_sums_the_weighted_cross_entropy_per_layer_and_counts_the_weights():
    """Eq. 1's parts: per layer, the sum of -log p(target) x weight, and the sum of the weights."""
    logp = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],
                                   [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]]))   # (layers 2, L 2, V 3)
    target = torch.tensor([2, 1])
    weight = torch.tensor([1.0, 0.5])
    sums, counts = mad.masked_nll(logp, target, weight)
    assert np.allclose(sums.tolist(), [-math.log(0.25) - 0.5 * math.log(0.8),
                                       -math.log(0.6) - 0.5 * math.log(0.2)])
    assert counts.tolist() == [1.5, 1.5]


def fixed_masks_and_log_probs(model, monkeypatch, bump):
    """Patches mad.random_mask (exactly round(ratio * L) positions, seeded) and model.log_probs
    (seeded 2-layer log-probs, then bump(task, logits) in place); returns the dicts of what each
    task got: its partial mask, its decoder inputs, its log-probs."""
    g = torch.Generator().manual_seed(0)
    seen = dict(mask={}, inputs={}, logp={}, last=None)

    def fixed_mask(shape, ratio, device):
        seen["last"] = (torch.rand(shape, generator=g).argsort(-1).argsort(-1)
                        < round(ratio * shape[-1]))
        return seen["last"]

    def fixed_log_probs(prompt, inputs, enc, task):
        lo, hi = model.vocab.task_range(task)
        logits = torch.randn(2, *inputs.shape, hi - lo, generator=g)
        bump(task, logits)
        seen["mask"][task], seen["inputs"][task] = seen["last"], inputs.clone()
        seen["logp"][task] = logits.log_softmax(-1)
        return seen["logp"][task]
    monkeypatch.setattr(mad, "random_mask", fixed_mask)
    monkeypatch.setattr(model, "log_probs", fixed_log_probs)
    return seen


@pytest.mark.parametrize("task", ["det", "seg", "cap"])
def test_loss_ignores_logits_of_unmasked_positions(task, monkeypatch):
    """Eq. 1: the loss ignores the logits of unmasked positions and changes with those of masked
    ones."""
    model = tiny_model()
    batch = random_batch(model)
    enc = model.encode(batch["images"], batch["padding"])
    seen = {}

    def loss():                                                   # summed CE per layer
        bump = lambda t, logits: logits.add_(seen.get("bump", 0))  # (patched anew: each pass draws
        fake = fixed_masks_and_log_probs(model, monkeypatch, bump)  # the same masks and log-probs)
        torch.manual_seed(5)                                      # the same shown / random words
        total = mad.LOSSES[task](model, batch, enc)[0]
        seen["inputs"] = fake["inputs"][task]
        return total
    base = loss()
    visible = seen["inputs"] != model.vocab.mask_token            # (B, 1+n, L): the partly masked
    assert visible.any() and (~visible).any()                     # copy's, and the full copy's word
    lo, hi = model.vocab.task_range(task)
    # unmasked logits only
    seen["bump"] = torch.randn(*visible.shape, hi - lo) * 5 * visible[..., None]
    assert torch.allclose(loss(), base, atol=1e-5)
    # masked ones: must change
    seen["bump"] = torch.randn(*visible.shape, hi - lo) * ~visible[..., None]
    assert not torch.allclose(loss(), base, atol=1e-3)


def mean_nll(logp, target, counted):
    """One layer: mean of -logp at the target over the counted positions. logp (..., V)."""
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return nll[counted].sum() / counted.sum()


def test_task_losses_are_the_mean_nll_of_masked_targets_per_layer_and_the_total_weights_them(
        monkeypatch):
    """Eq. 1: each task's loss is the mean NLL of its masked targets per layer; the total weights
    the tasks.

    Eq. 1 and supplementary C: per task and decoder layer, the loss is the mean -log p(target) over
    the masked positions that have a target (weight > 0); a task's loss sums its layers; the total
    is 1.5 det + 2.7 seg + 0.5 kpt + 0.3 cap. Fixed log-probs and masks; the slots holding the 3
    objects are sure of them, so the detection matching is unambiguous (other slots: <noise>)."""
    model = tiny_model(cap_full_word=False)             # every position of the full copy counts
    v = model.vocab
    batch = random_batch(model)                         # B = 2, objects in slots 0-2
    B, Q = batch["det_seq"].shape[:2]
    g = torch.Generator().manual_seed(1)
    batch["seg_weight"][1, 2:] = 0                      # padding rows
    # some keypoints unlabelled
    batch["kpt_weight"] = (torch.rand(batch["kpt_weight"].shape, generator=g) < 0.7).float()
    batch["cap_weight"][0, 3:] = 0                      # image 0 has 3 captions ...
    batch["cap_weight"][1, :, 12:] = 0                  # ... image 1 short ones
    full_ref = (0, 2)                                   # the reference layer 0 / layer 1 fits best

    def bump(task, logits):
        lo = v.task_range(task)[0]
        if task == "det":
            # (B, 15) tokens of slots 0-2
            gt = torch.stack(batch["det_gt"]).flatten(1) - lo
            logits[..., :15, :].scatter_(
                -1, gt[None, :, None, :, None].expand(2, B, 2, 15, 1), 10.0)
        if task == "cap":
            for layer, r in enumerate(full_ref):
                logits[layer, :, 0].scatter_(-1, batch["cap_seq"][:, r, :, None] - lo, 10.0)
    seen = fixed_masks_and_log_probs(model, monkeypatch, bump)
    total, parts = model.loss(batch)

    expected = {}
    for task in ("seg", "kpt"):                         # copies: fully masked, then partly
        lo = v.task_range(task)[0]
        seqs, has = batch[f"{task}_seq"], batch[f"{task}_weight"] > 0
        counted = torch.cat([has, has & seen["mask"][task]], 1)
        target = seqs.repeat(1, 2, 1) - lo
        expected[task] = sum(mean_nll(seen["logp"][task][l], target, counted) for l in range(2))
    lo = v.task_range("det")[0]
    target = torch.full((B, Q, 5), v.noise - lo)        # unmatched slots: <noise> class only
    has = torch.zeros(B, Q, 5, dtype=torch.bool)
    has[..., 4] = True
    target[:, :3], has[:, :3] = torch.stack(batch["det_gt"]) - lo, True
    counted = (torch.stack([torch.ones(B, 5 * Q, dtype=torch.bool), seen["mask"]["det"][:, 0]], 1)
               & has.view(B, 1, -1))
    expected["det"] = sum(mean_nll(seen["logp"]["det"][l],
                                   target.view(B, 1, -1).expand(B, 2, -1), counted)
                          for l in range(2))
    lo = v.task_range("cap")[0]
    refs, has = batch["cap_seq"] - lo, batch["cap_weight"] > 0
    expected["cap"] = sum(mean_nll(seen["logp"]["cap"][l], torch.cat([refs[:, r:r + 1], refs], 1),
                                   torch.cat([has[:, r:r + 1], has & seen["mask"]["cap"]], 1))
                          for l, r in enumerate(full_ref))
    for task in mad.TASKS:
        assert parts[task].item() == pytest.approx(expected[task].item(), rel=1e-5), task
    weighted = 1.5 * parts["det"] + 2.7 * parts["seg"] + 0.5 * parts["kpt"] + 0.3 * parts["cap"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_caption_loss_picks_each_layers_best_reference_by_mean_nll_and_perturbs_one_visible_token(
        monkeypatch):
    """3.2: the caption loss takes each layer's best reference by mean NLL and perturbs one visible
    token.

    3.1 / 3.2 captioning: the fully masked copy learns, per decoder layer, the reference of lowest
    MEAN cross-entropy under that layer's prediction (here: layer 0 a long reference over a short
    one of lower summed CE, layer 1 another); the partly masked copy holds every reference, its
    masked positions <mask>, exactly one visible token replaced by a random text token (the full
    copy all <mask> here: cap_full_word off; its shown word is tested below)."""
    model = tiny_model(max_captions=5, cap_full_word=False)
    v = model.vocab
    lo, hi = v.task_range("cap")
    batch = random_batch(model)
    B, R, L = batch["cap_seq"].shape
    # refs differ everywhere
    batch["cap_seq"] = lo + (7 * torch.arange(R)[:, None] + torch.arange(L)) % v.num_text
    batch["cap_seq"] = batch["cap_seq"].expand(B, R, L).clone()
    batch["cap_weight"][:, 3, 5:] = 0                       # reference 3: 5 tokens
    batch["cap_weight"][:, 4] = 0                           # no reference 4

    # full copy: layer 0 p(ref 0) high, p(ref 3) less; layer 1 p(ref 1)
    def bump(task, logits):
        logits[:, :, 0] *= 0.1
        logits[0, :, 0].scatter_add_(-1, batch["cap_seq"][:, 0, :, None] - lo,
                                     torch.full((B, L, 1), 4.0))
        logits[0, :, 0].scatter_add_(-1, batch["cap_seq"][:, 3, :, None] - lo,
                                     torch.full((B, L, 1), 3.0))
        logits[1, :, 0].scatter_add_(-1, batch["cap_seq"][:, 1, :, None] - lo,
                                     torch.full((B, L, 1), 4.0))
    seen = fixed_masks_and_log_probs(model, monkeypatch, bump)
    # (a seed where no random token equals the one it replaces)
    torch.manual_seed(0)
    sums, counts = mad.caption_loss(model, batch, None)

    refs, has = batch["cap_seq"] - lo, batch["cap_weight"] > 0
    logp, partial = seen["logp"]["cap"], seen["mask"]["cap"]
    full_nll = -logp[:, :, :1].expand(-1, -1, R, -1, -1).gather(
        -1, refs[None, ..., None].expand(2, -1, -1, -1, 1))[..., 0]
    full_sum = (full_nll * has).sum(-1)                             # (layers, B, R)
    mean = (full_sum / has.sum(-1)).nan_to_num(float("inf"))        # no reference 4: never best
    # sums disagree
    assert (mean[0].argmin(-1) == 0).all() and (full_sum[0, :, :4].argmin(-1) == 3).all()
    assert (mean[1].argmin(-1) == 1).all()
    for layer, r in enumerate((0, 1)):
        counted = torch.cat([has[:, r:r + 1], has & partial], 1)
        target = torch.cat([refs[:, r:r + 1], refs], 1)
        nll = -logp[layer].gather(-1, target[..., None])[..., 0]
        assert (counts[layer] == counted.sum()
                and sums[layer].item() == pytest.approx(nll[counted].sum().item(), rel=1e-6))
    inputs = seen["inputs"]["cap"]                                  # (B, 1 + R, L)
    assert (inputs[:, 0] == v.mask_token).all() and (inputs[:, 1:][partial] == v.mask_token).all()
    changed = (inputs[:, 1:] != batch["cap_seq"]) & ~partial
    assert (changed.sum(-1) == 1).all()
    assert ((inputs[:, 1:][changed] >= lo) & (inputs[:, 1:][changed] < hi)).all()


def test_cap_full_word_shows_one_random_word_in_the_fully_masked_copy_and_trains_the_rest(
        monkeypatch):
    """README: --cap-full-word shows one random word in the fully masked caption copy and trains the
    rest.

    README, where we differ (--cap-full-word, the default, as in the authors' code): the fully
    masked caption copy shows exactly one random text token, which is not a training target; its
    other positions are.
    Off, the copy is all <mask> and every position of its reference is a target."""
    for on in (False, True):
        model = tiny_model(max_captions=3, cap_full_word=on)
        lo, hi = model.vocab.task_range("cap")
        batch = random_batch(model)
        batch["cap_weight"][:] = 1                                    # every position a real token
        seen = fixed_masks_and_log_probs(model, monkeypatch, lambda task, logits: None)
        sums, counts = mad.caption_loss(model, batch, None)
        full, partial = seen["inputs"]["cap"][:, 0], seen["mask"]["cap"]      # (B, L), (B, R, L)
        shown = full != model.vocab.mask_token
        assert (shown.sum(-1) == (1 if on else 0)).all()
        assert ((full[shown] >= lo) & (full[shown] < hi)).all()
        B, L = full.shape
        assert (counts == B * L - int(shown.sum()) + partial.sum()).all()


def test_adamw_groups_lower_the_backbone_lr_and_spare_normalization_from_weight_decay():
    """Supplementary A: AdamW groups give the backbone its lr and spare normalization from weight
    decay.

    Supplementary A and the authors' code: the backbone trains at the backbone learning rate; the
    LayerNorm / GroupNorm weights and biases get no weight decay; every trainable parameter is in
    exactly one group."""
    model = tiny_model()
    groups = model.param_groups(1e-3, 1e-4, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert (sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
            and len(set(ids)) == len(ids))
    backbone = {id(p) for p in model.backbone.parameters()}
    norms = {id(m.weight) for m in model.modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == (1e-4 if id(p) in backbone else 1e-3)
            if id(p) in norms:
                assert g["weight_decay"] == 0.0
            elif p.dim() > 1:
                assert g["weight_decay"] == 0.05
    assert norms and any(g["weight_decay"] == 0.0 for g in groups)


def test_a_run_at_the_paper_presets_learning_rates_keeps_the_backbone_ten_times_lower(
        synth, tmp_path):
    """Supplementary A: at r50's rates (1e-4, backbone 1e-5) every step schedules each group.

    The tiny preset trains both at one rate, which would hide a schedule that sets one rate for
    all groups. A run with the r50 preset's two rates, through the warm-up (2 steps) and the x0.1
    drop at epoch 1 (step 3): after step 4 the backbone's groups are at 1e-6 and the others at
    1e-5, and after step 1 (half the warm-up) at 5e-6 and 5e-5."""
    _, r50, _ = train.parse_args(["--backbone", "r50"])
    assert (r50.lr, r50.backbone_lr) == (1e-4, 1e-5)
    rates = ["--lr", str(r50.lr), "--backbone-lr", str(r50.backbone_lr), "--warmup", "2"]
    model = tiny_model()
    in_backbone = {id(p) for p in model.backbone.parameters()}
    kinds = [id(g["params"][0]) in in_backbone for g in model.param_groups(1, 1, 0)]
    assert True in kinds and False in kinds
    for steps, factor in ((1, 0.5), (4, 0.1)):
        out = tmp_path / str(steps)
        train.main(run_args(synth, out, "--max-steps", str(steps), *rates))
        ckpt = torch.load(out / "last.pt", weights_only=True)
        expected = [(1e-5 if backbone else 1e-4) * factor for backbone in kinds]
        assert lrs(ckpt) == pytest.approx(expected, rel=1e-9)


# =============================================================================
# 3.2 / 4.1 Masked inference and post-processing

def test_one_stage_of_masked_inference_is_one_decoder_pass(monkeypatch):
    """3.2: one stage of masked inference is one decoder pass; predict then makes one pass per task.

    3.2: masked inference with one stage (ratio 1.0) is plain parallel decoding: exactly one decoder
    pass over the fully masked sequence, whose logits it returns; predict with one stage per task
    makes one pass per task, four in all."""
    model = tiny_model(kpt_ratios=(1.0,), cap_ratios=(1.0,))
    batch = random_batch(model)
    v, decode, passes = model.vocab, model.decode, []
    spy(monkeypatch, model, "decode", lambda tokens, memory, **k: passes.append(tokens.clone()))
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["padding"])
        for task, L, prompt in [("det", 5 * model.cfg.num_queries, v.det_prompt.expand(2, 1, 6)),
                                ("kpt", 51, batch["kpt_prompt"]),
                                ("cap", model.cfg.caption_len, v.cap_prompt.expand(2, 1, 6))]:
            h = decode(torch.cat([prompt, torch.full((*prompt.shape[:2], L), v.mask_token)], -1),
                       enc)[..., 6:, :]
            orders = [mad.random_order] + ([mad.visibility_order] if task == "kpt" else [])
            for order in orders:
                passes.clear()
                logits = mad.refine(model, prompt, L, enc, task, (1.0,), order)
                assert len(passes) == 1 and (passes[0][..., 6:] == v.mask_token).all(), task
                assert torch.allclose(logits, model.logits(h, task), atol=1e-6), task
        passes.clear()
        model.vocab.person = int(model.predict(batch["images"], batch["padding"],
                                               batch["orig_size"], tasks=("det",))[0]["labels"][0])
        passes.clear()
        model.predict(batch["images"], batch["padding"], batch["orig_size"])
    assert [p.shape[-1] for p in passes] == [6 + 5 * model.cfg.num_queries,
                                             6 + model.cfg.grid_size ** 2, 6 + 51,
                                             6 + model.cfg.caption_len]


def test_keypoint_stage_2_remasks_coordinates_by_their_keypoints_visibility_confidence(
        monkeypatch):
    """4.1: keypoint stage 2 re-masks the coordinates of the keypoints least sure of their
    visibility and feeds back the rest.

    3.2 / 4.1: keypoints in 2 stages (--kpt-ratios 1.0,0.7; the default is one, as the authors'
    configs): stage 2 re-masks round(0.7 * 51) = 36 positions of each sequence. As the authors'
    code, a keypoint's x and y rank by the confidence of its visibility token in stage 1 (its
    maximum probability), least confident first, and visibility tokens come last: the 34
    coordinates of all 17 keypoints and 2 visibility tokens are re-masked. Stage 1's tokens at
    the other positions are fed back. Checked on a hand-made confidence too: the keypoint with
    the least sure visibility loses its coordinates first."""
    model = tiny_model(kpt_ratios=(1.0, 0.7))
    batch = random_batch(model)
    v, lo = model.vocab, model.vocab.task_range("kpt")[0]
    calls = []
    spy(monkeypatch, model, "decode",
        lambda h, tokens, enc, **kw: calls.append((tokens.clone(), h)), with_result=True)
    prompt = batch["kpt_prompt"]                                                # (2, 4, 6)
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["padding"])
        mad.refine(model, prompt, 51, enc, "kpt", model.cfg.kpt_ratios, mad.visibility_order)
        assert len(calls) == 2
        (first, h1), (second, _) = calls
        _, tokens = mad.allowed(model.logits(h1[..., 6:, :], "kpt"), "kpt", v).softmax(-1).max(-1)
    assert (first[..., 6:] == v.mask_token).all() and torch.equal(second[..., :6], prompt)
    remasked = (second[..., 6:] == v.mask_token).unflatten(-1, (17, 3))
    assert (remasked.flatten(-2).sum(-1) == 36).all()
    assert remasked[..., :2].all() and (remasked[..., 2].sum(-1) == 2).all()
    kept = ~remasked.flatten(-2)
    assert torch.equal(second[..., 6:][kept], (tokens + lo)[kept])
    conf = torch.full((1, 1, 51), 0.9)
    conf[0, 0, 3 * 4 + 2] = 0.2                       # keypoint 4 least sure it is visible
    conf[0, 0, 3 * 9 + 2] = 0.5                       # keypoint 9 next
    conf[0, 0, 3 * 4] = 0.99                          # its own x: confident, but ranked by vis
    first_four = mad.visibility_order(conf, None).argsort(-1)[0, 0, :4].sort().values.tolist()
    assert first_four == [12, 13, 27, 28]


def test_masked_inference_averages_the_logits_of_the_stages_that_re_masked_a_position(monkeypatch):
    """3.2: masked inference averages at each position the logits of the stages that re-masked it.

    3.2 masked inference (remask_average "running", the default): at a re-masked position the new
    logits join a running average, elsewhere the logits stay: every position ends with the mean of
    the logits of the stages that re-masked it (stage 1 masks all). A stubbed decoder returns known
    logits at each stage."""
    model = tiny_model(remask_average="running")
    v, lo = model.vocab, model.vocab.task_range("cap")[0]
    B, n, L = 2, 3, model.cfg.caption_len
    g = torch.Generator().manual_seed(0)
    stage_logits = [torch.randn(B, n, L, v.num_text, generator=g) * 3 for _ in range(3)]
    inputs = []
    monkeypatch.setattr(model, "decode",
                        lambda tokens, enc: inputs.append(tokens) or torch.zeros(*tokens.shape, 1))
    monkeypatch.setattr(model, "logits", lambda h, task: stage_logits[len(inputs) - 1])
    logits = mad.refine(model, v.cap_prompt.expand(B, n, 6), L, None, "cap", (1.0, 0.8, 0.6),
                        mad.random_order)
    remasked = torch.stack([x[..., 6:] == v.mask_token for x in inputs])   # (stages, B, n, L)
    assert (remasked.sum(-1) == torch.tensor([20, 16, 12])[:, None, None]).all()
    count = remasked.sum(0)
    assert set(count.unique().tolist()) == {1, 2, 3}
    mean = lambda k: (sum(l * m[..., None] for l, m in zip(stage_logits[:k], remasked))
                      / remasked[:k].sum(0)[..., None])
    # the tokens fed back are the argmax of the average so far
    for k in (1, 2):
        assert torch.equal(inputs[k][..., 6:][~remasked[k]],
                           (mean(k).argmax(-1) + lo)[~remasked[k]])
    assert torch.allclose(logits, mean(3), atol=1e-5)


def test_halving_rule_weighs_later_stages_more(monkeypatch):
    """Masked inference, halving rule: each re-masking halves the ensemble, so later stages weigh
    more.

    The authors' caption ensembling (remask_average "halve"): at a re-masked position
    the ensemble becomes (ensemble + new) / 2, so a position re-masked at all four stages ends with
    the stages' logits weighted 1/8, 1/8, 1/4, 1/2 (the running mean gives 1/4 each)."""
    model = tiny_model(remask_average="halve")
    B, n, L = 1, 2, model.cfg.caption_len
    g = torch.Generator().manual_seed(0)
    stage_logits = [torch.randn(B, n, L, model.vocab.num_text, generator=g) for _ in range(4)]
    calls = []
    monkeypatch.setattr(model, "decode",
                        lambda tokens, enc: calls.append(1) or torch.zeros(*tokens.shape, 1))
    monkeypatch.setattr(model, "logits", lambda h, task: stage_logits[len(calls) - 1])
    logits = mad.refine(model, model.vocab.cap_prompt.expand(B, n, 6), L, None, "cap",
                        (1.0, 1.0, 1.0, 1.0), mad.random_order)
    expected = sum(w * l for w, l in zip((1 / 8, 1 / 8, 1 / 4, 1 / 2), stage_logits))
    assert torch.allclose(logits, expected, atol=1e-5)


def test_detection_score_classes_takes_the_softmax_over_classes_and_noise_only(monkeypatch):
    """4.1: --det-score classes takes the softmax over the real classes and <noise> only.

    --det-score classes: p(class) with the softmax over the real classes and <noise> only, so the
    coordinate tokens at the class position do not lower it (by hand, one slot)."""
    model = tiny_model(num_queries=1, num_bins=10, det_score="classes")
    C = model.vocab.num_classes
    det = torch.zeros(1, 1, 5, C + 1 + 11)
    # class 1, <noise>, a coordinate
    det[0, 0, 4, 1], det[0, 0, 4, C], det[0, 0, 4, C + 3] = 3.0, 1.0, 7.0
    monkeypatch.setattr(model, "logits", lambda h, task: det)
    enc = model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                       torch.zeros(1, 32, 32, dtype=torch.bool))
    with torch.no_grad():
        d = mad.detect(model, enc)
    assert d["labels"].tolist() == [[1]]
    assert d["scores"].item() == pytest.approx(
        math.exp(3) / (math.exp(3) + math.exp(1) + C - 1), rel=1e-5)
    # the variant is chosen when built
    model = tiny_model(num_queries=1, num_bins=10, det_score="all")
    monkeypatch.setattr(model, "logits", lambda h, task: det)
    with torch.no_grad():
        d = mad.detect(model, enc)
    assert d["scores"].item() == pytest.approx(
        math.exp(3) / (math.exp(3) + math.exp(1) + math.exp(7) + C - 1 + 10), rel=1e-5)


def test_predictions_of_an_image_do_not_depend_on_its_batch():
    """README: an image's predictions do not depend on its batch (fixed-seed re-masking).

    README: the random re-masking of masked inference uses a fixed seed, so a prediction does not
    depend on the batch: each image predicted alone == in a batch of 3 (float32 batch effects aside:
    scores and p(visible) agree to 1e-5)."""
    model = tiny_model()
    batch = random_batch(model, B=3)
    args = lambda s: (batch["images"][s], batch["padding"][s], batch["orig_size"][s])
    with torch.no_grad():
        top = model.predict(*args(slice(None)), tasks=("det",))[0]["labels"][0]
        model.vocab.person = int(top)             # untrained: "person" is a class it predicts
        together = model.predict(*args(slice(None)))
        alone = [model.predict(*args(slice(b, b + 1)))[0] for b in range(3)]
    assert sum(len(o["keypoints"]) for o in together) > 3
    for a, t in zip(alone, together):
        for k in ("boxes", "labels", "masks", "kpt_index", "caption_ids"):
            assert torch.equal(a[k], t[k]), k
        assert torch.allclose(a["scores"], t["scores"], atol=1e-5, rtol=0)
        assert torch.equal(a["keypoints"][..., :2], t["keypoints"][..., :2])
        assert torch.allclose(a["keypoints"][..., 2], t["keypoints"][..., 2], atol=1e-5, rtol=0)


def test_post_processing_turns_known_logits_into_boxes_scores_masks_keypoints_and_coco_results(
        monkeypatch):
    """4.1: post-processing turns known logits into boxes, scores, masks, keypoints and COCO
    results.

    4.1 inference and the COCO results: from known logits (3 slots, 10 bins, a 60 x 90 original
    image): corners ordered x0 <= x1 and y0 <= y1, bin centres scaled by the original width and
    height, the class = the best real class, its score = its probability over every detection token
    (so a likely <noise> lowers it), ranked by score; masks = p(<fg>) resampled into the box;
    keypoints from the person detections only, p(visible) over <vis>/<invis>; COCO results in xywh
    with the sparse category ids, keypoints scored by their detection. Expected values by hand."""
    model = tiny_model(num_queries=3, num_bins=10, grid_size=4)
    v, C = model.vocab, model.vocab.num_classes                       # 5 classes, person = 0
    slots = [((7, 2, 3, 8), {0: 5.0, C: 1.0}), ((1, 1, 4, 4), {C: 6.0, 2: 3.0}),
             ((5, 6, 9, 9), {3: 4.0})]
    det = torch.zeros(1, 1, 15, C + 1 + 11)
    for s, (bins, cls) in enumerate(slots):
        for j, b in enumerate(bins):
            det[0, 0, 5 * s + j, C + 1 + b] = 8.0
        for c, logit in cls.items():
            det[0, 0, 5 * s + 4, c] = logit
    seg = torch.zeros(1, 3, 16, 2)
    seg[..., 0] = torch.tensor([4.0, 4.0, -4.0, -4.0]).repeat(4)  # p(<fg>) high in the left half
    kpt = torch.zeros(1, 3, 51, 13)
    kpt[0, :, 0::3, 3], kpt[0, :, 1::3, 6] = 9.0, 9.0             # x bin 3, y bin 6
    kpt[0, :, 2::3, 11] = 2.0                                     # <vis> 2, <invis> 0
    cap = torch.zeros(1, 1, model.cfg.caption_len, v.num_text)
    cap[0, 0, torch.arange(model.cfg.caption_len),
        torch.arange(model.cfg.caption_len) % 7 + 3] = 5.0
    logits = dict(det=det, seg=seg, kpt=kpt, cap=cap)
    monkeypatch.setattr(model, "logits",
                        lambda h, task: logits[task][:, : h.shape[1]].expand(*h.shape[:3], -1))
    images = torch.zeros(1, 3, 64, 96, dtype=torch.uint8)
    pad = torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        p = model.predict(images, pad, torch.tensor([[60, 90]]))[0]
    # softmax denominators
    z = lambda cls: sum(math.exp(l) for l in cls.values()) + (C + 1 + 11 - len(cls))
    score = [math.exp(cls.get(c, 0.0)) / z(cls)
             for _, cls in slots for c in [max(range(C), key=lambda c: cls.get(c, 0.0))]]
    order = sorted(range(3), key=lambda s: -score[s])
    assert order == [0, 2, 1]
    assert (p["labels"].tolist() == [0, 3, 2]
            and np.allclose(p["scores"].tolist(), [score[s] for s in order], atol=1e-6))
    px = lambda b, size: (b + 0.5) / 10 * size
    boxes = [[px(min(b[0], b[2]), 90), px(min(b[1], b[3]), 60),
              px(max(b[0], b[2]), 90), px(max(b[1], b[3]), 60)]
             for b, _ in (slots[s] for s in order)]
    assert np.allclose(p["boxes"].tolist(), boxes, atol=1e-4)
    for k, (x0, y0, x1, y1) in enumerate(boxes):                  # the left half of each box
        cols = torch.arange(90) + 0.5
        inside_rows = ((torch.arange(60) + 0.5 >= y0) & (torch.arange(60) + 0.5 < y1))
        left = (cols >= x0 + 1) & (cols < (x0 + x1) / 2 - 1)
        right = (cols > (x0 + x1) / 2 + 1) | (cols < x0) | (cols >= x1)
        assert p["masks"][k][inside_rows][:, left].all() and not p["masks"][k][:, right].any(), k
        assert not p["masks"][k][~inside_rows].any()
    assert p["kpt_index"].tolist() == [0] and p["keypoints"].shape == (1, 17, 3)
    assert (np.allclose(p["keypoints"][0, :, 0], px(3, 90))
            and np.allclose(p["keypoints"][0, :, 1], px(6, 60)))
    assert np.allclose(p["keypoints"][0, :, 2], math.exp(2) / (math.exp(2) + 1), atol=1e-6)
    assert p["caption_ids"].tolist() == [i % 7 + 3 for i in range(model.cfg.caption_len)]
    cats = [dict(id=i, name=str(i)) for i in (1, 3, 5, 8, 11)]
    res = evaluate.to_coco_results([p], [42], cats)
    assert ([r["category_id"] for r in res["bbox"]] == [1, 8, 5]
            and all(r["image_id"] == 42 for r in res["bbox"]))
    assert np.allclose([r["bbox"] for r in res["bbox"]],
                       [[a, b, c - a, d - b] for a, b, c, d in boxes], atol=1e-4)
    assert np.allclose([r["score"] for r in res["bbox"]], [score[s] for s in order], atol=1e-6)
    assert len(res["keypoints"]) == 1 and res["keypoints"][0]["category_id"] == 1
    assert res["keypoints"][0]["score"] == pytest.approx(score[0], abs=1e-6)
    assert np.allclose(res["keypoints"][0]["keypoints"][:6],
                       [px(3, 90), px(6, 60), math.exp(2) / (math.exp(2) + 1)] * 2, atol=1e-5)
    decoded = evaluate.rle_to_masks([r["segmentation"] for r in res["segm"]], 60, 90)
    assert torch.equal(decoded, p["masks"]) and [r["category_id"] for r in res["segm"]] == [1, 8, 5]


def test_paste_masks_fills_the_box_only():
    """4.1: paste_masks fills the box only: a full mask exactly the box, a left-half mask its left
    part."""
    prob = torch.ones(2, 16, 16)
    prob[1, :, 8:] = 0                                                       # left half foreground
    m = mad.paste_masks(prob, torch.tensor([[10., 20., 50., 60.], [0., 0., 40., 40.]]), 80, 100)
    assert m[0, 20:60, 10:50].all() and m[0].sum() == 40 * 40
    assert m[1, :40, :19].all() and not m[1, :, 21:].any()


def test_vectorized_paste_equals_resizing_each_mask_into_its_box():
    """4.1: pasting all masks at once equals resizing each into its box and thresholding at 0.5.

    Masks are pasted on the model's device, all at once. That must equal the plain
    way: each mask bilinearly resized (align_corners=False) to its box's pixels, placed there and
    thresholded at 0.5 (positions whose value lies within 1e-4 of 0.5 are left out: float order)."""
    g = torch.Generator().manual_seed(0)
    K, M, H, W = 20, 8, 60, 90
    prob = torch.rand(K, M, M, generator=g)
    x0, y0 = torch.randint(0, W - 2, (K,), generator=g), torch.randint(0, H - 2, (K,), generator=g)
    x1 = (x0 + torch.randint(1, W, (K,), generator=g)).clamp(max=W)
    y1 = (y0 + torch.randint(1, H, (K,), generator=g)).clamp(max=H)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    pasted = mad.paste_masks(prob, boxes, H, W, chunk=6)
    assert pasted.shape == (K, H, W) and pasted.dtype == torch.bool
    for k, (a, b, c, d) in enumerate(boxes.long().tolist()):
        ref = torch.zeros(H, W)
        ref[b:d, a:c] = torch.nn.functional.interpolate(prob[k][None, None], size=(d - b, c - a),
                                                        mode="bilinear", align_corners=False)[0, 0]
        clear = (ref - 0.5).abs() > 1e-4
        assert torch.equal(pasted[k][clear], (ref >= 0.5)[clear]), k
        assert not pasted[k][:b].any() and not pasted[k][d:].any() and not pasted[k][:, :a].any()


def check_prediction(out, model, batch):
    Q, (H, W) = model.cfg.num_queries, batch["orig_size"][0].tolist()
    assert len(out) == len(batch["images"])
    for o in out:
        assert (o["boxes"].shape == (Q, 4) and o["scores"].shape == (Q,)
                and o["labels"].shape == (Q,))
        assert (o["scores"][:-1] >= o["scores"][1:]).all()                  # sorted
        assert (o["boxes"][:, :2] <= o["boxes"][:, 2:]).all()
        assert (o["boxes"][:, 2] <= W).all() and (o["boxes"][:, 3] <= H).all()
        assert (o["masks"].shape == (min(model.cfg.seg_topk, Q), H, W)
                and o["masks"].dtype == torch.bool)
        P = len(o["kpt_index"])
        assert (o["keypoints"].shape == (P, 17, 3)
                and (o["labels"][o["kpt_index"]] == model.vocab.person).all())
        assert o["caption_ids"].shape == (model.cfg.caption_len,)


def test_one_training_step_and_prediction_shapes_for_both_decoders():
    """Both decoders: a training step reaches every parameter, and predictions have the documented
    shapes."""
    for decoder in ("mad", "ar"):
        model = tiny_model(decoder).train()
        batch = random_batch(model)
        loss, parts = model.loss(batch)
        loss.backward()
        assert set(parts) == set(mad.TASKS) and torch.isfinite(loss)
        assert all(p.grad is not None for n, p in model.named_parameters()
                   if p.requires_grad), decoder
        out = model.eval().predict(batch["images"], batch["padding"], batch["orig_size"])
        check_prediction(out, model, batch)


def test_r50_default_training_step_and_predict_at_800x1333():
    """The r50 preset (40-50M parameters) trains a step and predicts at 800 x 1333; its stem stays
    frozen.

    The training step runs at 320 x 544 (the same code at a quarter of the pixels: the full size's
    step and its memory are bench.py's), the prediction at 800 x 1333 padded to 800 x 1344."""
    torch.manual_seed(0)
    cfg = Config(**PRESETS["r50"])
    vocab = Vocab(num_classes=80, num_bins=cfg.num_bins, num_text=1000, person=0)
    model = MAD(cfg, vocab)
    assert 40e6 < sum(p.numel() for p in model.parameters()) < 50e6
    batch = random_batch(model, B=1, size=320, n_gt=7)
    # 533 padded to 32
    batch["images"] = torch.randint(0, 256, (1, 3, 320, 544), dtype=torch.uint8)
    batch["padding"] = torch.zeros(1, 320, 544, dtype=torch.bool)
    batch["padding"][:, :, 533:] = True
    batch["size"], batch["orig_size"] = torch.tensor([[320, 533]]), torch.tensor([[480, 800]])
    loss, _ = model.train().loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone[0].weight.grad is None                             # frozen stem
    images = torch.randint(0, 256, (1, 3, 800, 1344), dtype=torch.uint8)
    padding = torch.zeros(1, 800, 1344, dtype=torch.bool)
    padding[:, :, 1333:] = True
    with torch.no_grad():
        out = model.eval().predict(images, padding, batch["orig_size"])
    check_prediction(out, model, batch)


# =============================================================================
# Table 2: the autoregressive baseline

def test_ar_baseline_trains_on_its_targets_shifted_right_by_one_with_the_objects_first(monkeypatch):
    """Table 2: the AR baseline trains on its targets shifted right by one, with the objects first.

    Table 2 / supplementary B, the autoregressive baseline: detection sequences put the objects
    first (in slot order), then the noise objects, whose class target is <noise> and boxes weigh 0;
    the decoder input is [prompt, <start>, targets[:-1]] with a causal decoder, and the loss is each
    layer's mean -log p(next token), on every decoder layer (fixed log-probs, by hand)."""
    model = tiny_model("ar", num_queries=4)
    v = model.vocab
    batch = random_batch(model, B=1, n_gt=0)
    seq = batch["det_seq"][0].clone()                               # (4, 5)
    batch["det_gt"] = [seq[[3, 0]].clone()]                         # objects in slots 3 and 0
    seen = {}
    g = torch.Generator().manual_seed(0)

    def decode(tokens, enc, all_layers=False, **kw):                # 2 layers' outputs if asked
        seen.setdefault("tokens", {})[tokens.shape[-1]] = tokens
        return torch.zeros(*(2,) * bool(all_layers), *tokens.shape, model.cfg.d_model)
    def logits(h, task):
        lo, hi = v.task_range(task)
        seen[task] = torch.randn(*h.shape[:-1], hi - lo, generator=g)
        return seen[task]
    monkeypatch.setattr(model, "decode", decode)
    monkeypatch.setattr(model, "logits", logits)
    sums, counts = (x["det"] for x in model(batch, ("det",)))
    assert sums.shape == counts.shape == (2,)                       # a loss on every layer, as MAD
    target = torch.cat([seq[0], seq[3], seq[1], seq[2]]).clone()
    target[14], target[19] = v.noise, v.noise                       # noise objects' classes
    weight = torch.ones(20)
    weight[10:14] = weight[15:19] = 0                               # ... their boxes
    tokens = seen["tokens"][6 + 20][0, 0]
    assert tokens[:6].tolist() == v.det_prompt.tolist() and tokens[6] == v.start
    assert torch.equal(tokens[7:], target[:-1])
    lo = v.task_range("det")[0]
    for layer in range(2):
        nll = -seen["det"][layer, 0, 0].log_softmax(-1).gather(-1, (target - lo)[:, None])[:, 0]
        assert sums[layer].item() == pytest.approx((nll * weight).sum().item(), rel=1e-6)
        assert counts[layer] == weight.sum()
    batch["cap_weight"][:, 1:] = 0
    sums, counts = (x["cap"] for x in model(batch, ("cap",)))
    refs = batch["cap_seq"][0]
    tokens = seen["tokens"][6 + model.cfg.caption_len][0]
    assert (tokens[:, 6] == v.start).all() and torch.equal(tokens[:, 7:], refs[:, :-1])
    assert counts[0] == model.cfg.caption_len


def test_allowed_tokens_per_position_and_greedy_ar_decoding_feeds_back_the_best_allowed_token(
        monkeypatch):
    """Table 2: each position allows its own tokens; greedy AR decoding feeds back the best allowed
    one.

    Inference restricts each position to the tokens that can stand there (detection: coordinates,
    and a class or <noise> at every 5th; keypoints: coordinates, and <vis>/<invis> at every 3rd);
    the autoregressive baseline feeds back the best allowed token of each step, at its sequence
    position."""
    model = tiny_model("ar", num_queries=2)
    v, C = model.vocab, model.vocab.num_classes
    lo, hi = v.task_range("det")
    logits = torch.zeros(10, hi - lo)
    logits[:, 0] = 5.0                                      # class 0 everywhere ...
    logits[:, C + 1 + 7] = 3.0                              # ... and coordinate bin 7 second
    out = mad.allowed(logits, "det", v)
    best = out.argmax(-1).tolist()
    assert best == [C + 1 + 7] * 4 + [0] + [C + 1 + 7] * 4 + [0]
    assert torch.isinf(out[4, C + 1:]).all() and torch.isinf(out[0, : C + 1]).all()
    k = mad.allowed(torch.zeros(6, v.task_range("kpt")[1] - v.task_range("kpt")[0]), "kpt", v)
    nb = v.num_bins + 1
    assert (torch.isinf(k[[0, 1, 3, 4], nb:]).all() and torch.isinf(k[[2, 5], :nb]).all()
            and torch.isfinite(k[2, nb:]).all())
    inputs, offsets = [], []
    def decode_step(tokens, enc, caches, start):
        inputs.append(tokens.clone()); offsets.append(start)
        return torch.zeros(*tokens.shape, model.cfg.d_model)
    monkeypatch.setattr(model, "decode_step", decode_step)
    monkeypatch.setattr(model, "logits", lambda h, task: logits[:1].expand(*h.shape[:-1], -1))
    model.generate(v.det_prompt.expand(1, 1, 6), 10, None, "det")
    assert offsets == [0] + [6 + t for t in range(1, 10)]
    fed = torch.cat([inputs[0][..., 7:]] + [x[..., -1:] for x in inputs[1:]], -1)[0, 0]
    assert inputs[0][0, 0, 6] == v.start and (fed - lo).tolist() == best[:9]


def test_ar_greedy_decoding_with_kv_cache_equals_without():
    """Table 2: greedy AR decoding with the KV cache gives the tokens and logits of decoding without
    it."""
    model = tiny_model("ar")
    batch = random_batch(model)
    v = model.vocab
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["padding"])
        for task, L, prompt in [("det", 40, v.det_prompt.expand(2, 1, 6)),
                                ("kpt", 51, batch["kpt_prompt"][:, :2]),
                                ("cap", 20, v.cap_prompt.expand(2, 1, 6))]:
            cached, plain = (model.generate(prompt, L, enc, task),
                             model.generate(prompt, L, enc, task, use_cache=False))
            assert torch.equal(cached.argmax(-1), plain.argmax(-1))
            assert torch.allclose(cached, plain, atol=1e-5)


def test_ar_detection_sequences_put_each_images_own_objects_first():
    """Table 2: each image of a batch puts its own objects first; the rest of its slots are noise.

    Two images with 1 and 3 objects (slots 2; slots 3, 1, 0): image 0 has one object position and
    three noise objects, image 1 three object positions and one; by hand."""
    v = tiny_model("ar", num_queries=4).vocab
    slots = torch.arange(2 * 4 * 5).view(2, 4, 5) % 40 + v.coord              # distinct slot tokens
    batch = dict(det_seq=slots, det_gt=[slots[0, [2]], slots[1, [3, 1, 0]]])
    prompt, target, weight = mad.ar_sequences(batch, "det", v)
    order = [[2, 0, 1, 3], [0, 1, 3, 2]]                    # objects in slot order, then the rest
    for b, n in enumerate((1, 3)):
        expect = slots[b, order[b]].clone()
        expect[n:, 4] = v.noise
        w = torch.ones(4, 5)
        w[n:, :4] = 0
        assert (torch.equal(target[b, 0], expect.flatten())
                and torch.equal(weight[b, 0], w.flatten())), b
    assert torch.equal(prompt, v.det_prompt.expand(2, 1, 6))


def test_causal_self_attention_equals_a_masked_softmax_by_hand_and_drops_only_in_training():
    """Table 2: the baseline's self-attention is causal, equal to a masked softmax by hand; no
    dropout at inference.

    Causal multi-head attention (2 heads) against a reference written here: scores
    q.k / sqrt(d_head), -inf above the diagonal, softmax, times v, output projection; with the
    key/value cache, one step at a time gives the same rows. With dropout 0.5 the module drops in
    training only."""
    torch.manual_seed(0)
    attn = mad.Attention(8, 2, dropout=0.5).eval()
    q, x = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    split = lambda t: t.view(3, 5, 2, 4).transpose(1, 2)
    Q, K, V = split(attn.q(q)), split(attn.k(q)), split(attn.v(x))
    scores = Q @ K.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expect = attn.out((scores.softmax(-1) @ V).transpose(1, 2).reshape(3, 5, 8))
    with torch.no_grad():
        got = mad.causal_self_attention(attn, q, x)
        cache = {}
        steps = torch.cat([mad.causal_self_attention(attn, q[:, t:t + 1], x[:, t:t + 1], cache)
                           for t in range(5)], 1)
    assert torch.allclose(got, expect, atol=1e-5) and torch.allclose(steps, expect, atol=1e-5)
    assert not torch.allclose(mad.causal_self_attention(attn.train(), q, x), expect, atol=1e-3)


def test_ar_baseline_trains_saves_loads_and_evaluates_through_evaluate_py(synth, tmp_path):
    """Table 2: the AR baseline trains through train.py, saves, loads and is scored by
    evaluate.py."""
    train.main(run_args(synth, tmp_path / "ar", "--decoder", "ar", "--max-steps", "2"))
    run([sys.executable, "evaluate.py", str(tmp_path / "ar/last.pt"), "--device", "cpu",
         "--workers", "0", "--max-images", "4", "--out", str(tmp_path / "ar/eval")])
    m = json.load(open(tmp_path / "ar/eval/metrics.json"))
    assert m["num_images"] == 4 and {"bbox_AP", "segm_AP", "keypoints_AP", "BLEU4"} <= set(m)
    assert torch.load(tmp_path / "ar/last.pt", weights_only=True)["config"]["decoder"] == "ar"


# =============================================================================
# Data pipeline: batching, data order, the synthetic set, real COCO, memory

def test_collate_pads_to_multiple_of_32_with_pixel_mask(synth, tokenizer):
    """Batching: collate pads dataset images to multiples of 32; padding marks exactly the
    padding."""
    cfg = tiny_cfg()
    ds = data.CocoMultiTask(synth, "train2017", cfg, tokenizer, train=True)
    samples = [ds[i] for i in range(4)]
    batch = data.collate(samples)
    assert batch["images"].shape[2] % 32 == 0 and batch["images"].shape[3] % 32 == 0
    for k, (im, _) in enumerate(samples):
        h, w = im.shape[1:]
        assert (not batch["padding"][k, :h, :w].any()
                and batch["padding"][k].sum() == batch["padding"][k].numel() - h * w)
        assert torch.equal(batch["images"][k, :, :h, :w], im)


def test_collate_pads_each_image_to_the_batch_multiple_and_trims_all_padding_rows():
    """Batching: images pad to the batch's size rounded up to 32; rows that are all padding are
    trimmed.

    Batching: images of different, non-square sizes padded (bottom/right) to the batch's largest
    size rounded up to a multiple of 32, padding True on padding; segmentation/keypoint rows that
    are padding in every image are trimmed (at least one row stays); object lists stay lists."""
    S, M = 4, 2
    def sample(h, w, seg_rows, kpt_rows, n):
        im = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w)
        t = dict(image_id=n, size=torch.tensor([h, w]), orig_size=torch.tensor([h, w]),
                 boxes=torch.rand(n, 4), det_gt=torch.ones(n, 5, dtype=torch.long),
                 seg_prompt=torch.arange(S * 6).view(S, 6),
                 seg_seq=torch.zeros(S, M * M, dtype=torch.long),
                 seg_weight=(torch.arange(S) < seg_rows).float()[:, None].expand(S, M * M).clone(),
                 kpt_prompt=torch.zeros(S, 6, dtype=torch.long),
                 kpt_seq=torch.zeros(S, 51, dtype=torch.long),
                 kpt_weight=(torch.arange(S) < kpt_rows).float()[:, None].expand(S, 51).clone())
        return im, t
    samples = [sample(50, 70, 2, 0, 3), sample(64, 33, 1, 0, 1), sample(20, 100, 0, 0, 0)]
    b = data.collate(samples)
    assert b["images"].shape == (3, 3, 64, 128) and b["padding"].shape == (3, 64, 128)
    for k, (im, t) in enumerate(samples):
        h, w = im.shape[1:]
        assert (torch.equal(b["images"][k, :, :h, :w], im) and (b["images"][k, :, h:] == 0).all()
                and (b["images"][k, :, :, w:] == 0).all())
        assert (not b["padding"][k, :h, :w].any() and b["padding"][k, h:].all()
                and b["padding"][k, :, w:].all())
    assert (b["seg_seq"].shape == (3, 2, M * M)
            and torch.equal(b["seg_prompt"][0], samples[0][1]["seg_prompt"][:2]))
    assert b["kpt_seq"].shape == (3, 1, 51) and b["kpt_weight"].sum() == 0
    assert [len(g) for g in b["det_gt"]] == [3, 1, 0] and b["image_id"].tolist() == [3, 1, 0]
    assert data.collate(samples, multiple=128)["images"].shape[-2:] == (128, 128)


def test_data_order_is_a_seeded_permutation_per_epoch_dealt_over_ranks_and_replicas_stay_identical(
        synth, tmp_path):
    """Data order: a seeded permutation per epoch, dealt over ranks; the replicas stay identical.

    The data order: each epoch reads a permutation of the images seeded by (seed, epoch), global
    step s taking its images s*B .. (s+1)*B - 1; with 2 processes each takes every other one of
    those (the same images per step); a new epoch gives a new order. The 2-process run also checks
    at each checkpoint that both processes hold the same parameters (train.py raises otherwise)."""
    # 24 images: 4 steps an epoch
    flags = ["--batch-size", "6", "--max-steps", "8", "--save-every", "2", "--seed", "3"]
    for name, launch in (("one", [sys.executable]), ("two", torchrun(2))):
        out = tmp_path / name
        out.mkdir()
        script = tmp_path / f"record_{name}.py"
        script.write_text(RECORD_ORDER.format(here=HERE, out=str(out)))
        p = run([*launch, str(script), *run_args(synth, out, *flags)])
    assert "2 process(es) x 3 images" in p.stdout
    assert [json.loads(l)["step"] for l in open(tmp_path / "two/log.jsonl")] == list(range(1, 9))
    one = recorded_steps(tmp_path / "one", 0, 6)
    two = [recorded_steps(tmp_path / "two", r, 3) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 8
    for s in range(8):
        epoch = s // 4
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert one[s] == (epoch, perm[6 * (s % 4): 6 * (s % 4) + 6]), s
        for r in (0, 1):
            assert two[r][s] == (epoch, perm[6 * (s % 4) + r: 6 * (s % 4) + 6: 2]), (s, r)
    assert one[0][1] != one[4][1]


def gt_as_results(coco, iou_type):
    res = []
    for a in coco.loadAnns(coco.getAnnIds()):
        r = dict(image_id=a["image_id"], category_id=a["category_id"], score=1.0)
        r.update(bbox=a["bbox"]) if iou_type == "bbox" else None
        r.update(segmentation=coco.annToRLE(a)) if iou_type == "segm" else None
        r.update(keypoints=a["keypoints"]) if iou_type == "keypoints" else None
        res.append(r)
    return res


def test_synthetic_set_is_valid_coco_and_its_ground_truth_scores_ap_1(synth):
    """The synthetic set is valid COCO: each file has images and annotations; its ground truth
    scores AP 1."""
    for split in ("train2017", "val2017"):
        for kind in ("instances", "person_keypoints", "captions"):
            gt = evaluate.quiet(COCO, f"{synth}/annotations/{kind}_{split}.json")
            assert gt.getImgIds() and gt.getAnnIds(), (kind, split)
    for kind, iou_type in (("instances", "bbox"), ("instances", "segm"),
                           ("person_keypoints", "keypoints")):
        gt = evaluate.quiet(COCO, f"{synth}/annotations/{kind}_val2017.json")
        ev = COCOeval(gt, evaluate.quiet(gt.loadRes, gt_as_results(gt, iou_type)), iou_type)
        for step in (ev.evaluate, ev.accumulate, ev.summarize):
            evaluate.quiet(step)
        assert ev.stats[0] == pytest.approx(1.0), iou_type


def test_synthetic_set_is_deterministic_and_drawn_where_annotated(tmp_path):
    """The synthetic set is the same for the same seed, and each object is drawn where it is
    annotated."""
    for name in ("a", "b"):
        coco.make_synthetic_coco(str(tmp_path / name), 4, 2, seed=7)
    for f in ("annotations/instances_train2017.json", "annotations/captions_val2017.json",
              "train2017/000000000003.jpg"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    d = json.loads((tmp_path / "a/annotations/instances_train2017.json").read_text())
    kp = json.loads((tmp_path / "a/annotations/person_keypoints_train2017.json").read_text())
    assert ({c["id"] for c in d["categories"]} == {1, 3, 5, 8, 11}
            and len(kp["categories"][0]["keypoints"]) == 17)
    for a in d["annotations"][:6]:                # the polygon's pixels are the object's colour
        im = d["images"][a["image_id"] - 1]
        pixels = np.array(Image.open(tmp_path / "a/train2017" / im["file_name"]), np.float32)
        m = data.decode_segmentation(a["segmentation"], im["height"], im["width"]).astype(bool)
        assert np.linalg.norm(pixels[m].mean(0) - pixels[~m].mean(0)) > 30


def test_real_coco_excerpt_loads_with_sparse_ids_polygons_keypoints_and_captions(tmp_path, synth):
    """Real COCO annotations (an excerpt) load: sparse ids, polygons, keypoints and captions."""
    root, files = excerpt_root(tmp_path)
    tok = mad.CaptionTokenizer(data.train_caption_tokenizer(
        f"{root}/annotations/captions_val2017.json", str(tmp_path / "spm"), 200))
    cfg = tiny_cfg(image_size=256, max_size=400)
    ds = data.CocoMultiTask(root, "val2017", cfg, tok, train=True)
    ids = [c["id"] for c in files["instances"]["categories"]]
    assert (len(ds.categories) == 80 and [c["id"] for c in ds.categories] == sorted(ids)
            and max(ids) == 90)
    assert ds.categories[ds.vocab.person]["name"] == "person"
    objects = persons = 0
    for i in range(len(ds)):
        _, t = ds[i]
        objects += len(t["det_gt"])
        persons += int(t["kpt_weight"].any(1).sum())
        assert (t["det_gt"][:, 4] - ds.vocab.cls < 80).all()
    assert objects > 50 and persons > 10
    caption_images = {a["image_id"] for a in files["captions"]["annotations"]}
    assert sum(bool(ds.ann.captions(i)) for i in range(len(ds))) == len(caption_images)
    # a contiguous index maps back to the sparse COCO id
    a = files["instances"]["annotations"][0]
    i = ds.ann.row(a["image_id"])
    labels = {ds.categories[int(c)]["id"] for c in (ds[i][1]["det_gt"][:, 4] - ds.vocab.cls)}
    assert a["category_id"] in labels


def test_annotations_are_held_as_arrays_not_one_python_object_per_annotation(tmp_path, tokenizer):
    """Memory: annotations are held as arrays, not a Python object each; images are handed over as
    uint8.

    COCO-scale memory: loading 10x the annotations on the same images adds no Python objects (the
    annotations are numpy arrays with offsets; a worker reading them writes none of their pages),
    the dataset hands images over as uint8, and the model normalizes them itself."""
    import gc
    def annotated(name, copies):
        root = tmp_path / name
        coco.make_synthetic_coco(str(root), 0, 6)
        for kind in ("instances", "captions"):
            d = load_json(root / f"annotations/{kind}_val2017.json")
            d["annotations"] = [dict(a, id=10 ** 6 * k + a["id"])
                                for k in range(copies) for a in d["annotations"]]
            (root / f"annotations/{kind}_val2017.json").write_text(json.dumps(d))
        return str(root)
    counts = []
    for name, copies in (("one", 1), ("ten", 10)):
        root = annotated(name, copies)
        gc.collect()
        n = len(gc.get_objects())
        ds = data.CocoMultiTask(root, "val2017", tiny_cfg(), tokenizer, train=False)
        gc.collect()
        counts.append(len(gc.get_objects()) - n)
        assert len(ds.ann.obj_box) > 10 * copies
    assert counts[1] - counts[0] < 50, counts
    image, _ = ds[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    with pytest.raises(TypeError, match="uint8"):
        MAD(tiny_cfg(), ds.vocab).encode(image[None].float(),
                                         torch.zeros(1, *image.shape[1:], dtype=torch.bool))


def test_each_epochs_data_workers_end_before_the_checkpoint_and_the_next_epoch(
        synth, tmp_path, monkeypatch):
    """Memory: no data-loader worker of a finished epoch is alive when its checkpoint is written.

    Memory over days: at each end of an epoch (where the checkpoint is written and the next epoch's
    workers are forked) no data-loader worker of the finished epoch is alive."""
    import multiprocessing
    alive = []
    spy(monkeypatch, runtime, "save_run",
        lambda *a, **k: alive.append(len(multiprocessing.active_children())))
    train.main(run_args(synth, tmp_path / "w", "--workers", "1", "--max-steps", "6"))
    assert alive == [0, 0], alive


# =============================================================================
# Evaluation: COCO AP, BLEU-4, results, distributed evaluation, own images, checkpoints

def test_coco_ap_equals_cocoeval_on_a_hand_built_case_restricted_to_the_evaluated_images(tmp_path):
    """Evaluation: coco_ap equals COCOeval's AP, AP50, AP75 over the evaluated images only.

    Evaluation: coco_ap is COCOeval's AP, AP50, AP75 (in percent) over the evaluated images only
    (an annotated image that was not evaluated does not count as missed), for boxes and keypoints;
    no results give 0."""
    gt = dict(images=[dict(id=i, width=100, height=80) for i in (1, 2, 3)],
              categories=[dict(id=1, name="person", keypoints=coco.KEYPOINTS,
                               skeleton=coco.SKELETON), dict(id=7, name="box")],
              annotations=[])
    def add(image_id, cat, box, kp=None):
        a = dict(id=len(gt["annotations"]) + 1, image_id=image_id, category_id=cat, bbox=box,
                 iscrowd=0, area=box[2] * box[3],
                 segmentation=[rect(box[0], box[1], box[0] + box[2], box[1] + box[3])])
        if kp is not None:
            a.update(keypoints=kp, num_keypoints=17)
        gt["annotations"].append(a)
    kp = lambda x, y: [c for i in range(17) for c in (x + i, y + (i * 7) % 17, 2)]
    add(1, 7, [10, 10, 30, 20]); add(1, 1, [50, 10, 30, 60], kp(55, 20))
    add(2, 7, [0, 0, 40, 40]); add(3, 7, [5, 5, 20, 20])
    path, kp_path = tmp_path / "gt.json", tmp_path / "gt_keypoints.json"
    path.write_text(json.dumps(gt))
    kp_path.write_text(json.dumps(dict(gt, annotations=[a for a in gt["annotations"]
                                                        if "keypoints" in a])))
    results = dict(
        bbox=[dict(image_id=1, category_id=7, bbox=[12, 10, 30, 20], score=0.9),  # IoU 0.87
              dict(image_id=1, category_id=7, bbox=[60, 50, 20, 20], score=0.8),  # false positive
              dict(image_id=1, category_id=1, bbox=[50, 12, 30, 56], score=0.7),
              dict(image_id=2, category_id=7, bbox=[8, 8, 40, 40], score=0.6)],   # IoU 0.52
        keypoints=[dict(image_id=1, category_id=1, keypoints=kp(56, 21), score=0.7)])
    for iou_type, file in (("bbox", path), ("keypoints", kp_path)):
        gt = evaluate.quiet(COCO, str(file))
        ev = COCOeval(gt, evaluate.quiet(gt.loadRes, results[iou_type]), iou_type)
        ev.params.imgIds = [1, 2]
        for step in (ev.evaluate, ev.accumulate, ev.summarize):
            evaluate.quiet(step)
        got = evaluate.coco_ap(str(file), results[iou_type], iou_type, [2, 1])
        assert (np.allclose(got, [100 * s for s in ev.stats[:3]], atol=1e-9)
                and 0 < got[0] < 100), (iou_type, got)
    everything = evaluate.coco_ap(str(path), results["bbox"], "bbox", [1, 2, 3])
    assert everything[0] < evaluate.coco_ap(str(path), results["bbox"], "bbox", [1, 2])[0]
    assert evaluate.coco_ap(str(path), [], "bbox", [1, 2]) == (0.0, 0.0, 0.0)


def test_bleu4_equals_hand_computed_values():
    """BLEU-4 equals hand-computed values: brevity penalty, clipping, several references, corpus
    counts."""
    refs = {1: ["a red circle on grey"]}
    assert evaluate.bleu4({1: "A red circle, on grey."}, refs) == pytest.approx(1.0, abs=1e-6)
    # brevity penalty: 5 words vs a 7-word reference (\"on grey\" is no reference bigram)
    assert evaluate.bleu4({1: "a red circle on grey"},
                          {1: ["a red circle on a grey background"]}) == \
        pytest.approx((5 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 7 / 5), rel=1e-6)
    # clipping: "w x y z" twice against one "w x y z q": clipped matches 4/8, 3/7, 2/6, 1/5
    assert evaluate.bleu4({1: "w x y z w x y z"}, {1: ["w x y z q"]}) == \
        pytest.approx((4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25, rel=1e-6)
    # several references: n-grams clip against the best one, length = the closest (tie: the shorter)
    multi = {1: ["a red circle", "a red circle on grey now", "a red circle on grey"]}
    assert evaluate.bleu4({1: "a red circle on grey"}, multi) == pytest.approx(1.0, abs=1e-6)
    tie = {1: ["one two three four", "one two three four five six"]}   # 5 words: 4 and 6 tie -> 4
    assert evaluate.bleu4({1: "one two three four five"}, tie) == pytest.approx(1.0, abs=1e-6)
    # corpus level: counts are summed over images before the geometric mean
    two = evaluate.bleu4({1: "a b c d", 2: "e f g h i"}, {1: ["a b c d"], 2: ["e f g h x"]})
    assert two == pytest.approx((8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25, rel=1e-6)


def test_bleu4_clips_each_ngram_by_its_most_frequent_reference_and_takes_the_closest_length():
    """BLEU-4 clips each n-gram by its most frequent reference; the brevity penalty takes the
    closest length.

    BLEU-4 (the COCO caption scorer's) with several references, by hand: an n-gram's count is
    clipped by its count in the reference that has it most often (not the sum, not one reference),
    and the brevity penalty takes the reference length closest to the caption's (not the shortest or
    longest); over a corpus, lengths and counts are summed over its images before the ratios."""
    refs = ["a b c d e f g h i j k l", "x a b a b y z", "c d a"]           # 12, 7 and 3 words
    # "a b c d a b": 1-grams 6/6, 2-grams 5/5 (ab twice: the 2nd reference), 3-grams 3/4
    # (abc, bcd, cda), 4-grams 1/3 (abcd); 6 words, closest reference 7:
    # brevity penalty exp(1 - 7/6)
    assert evaluate.bleu4({1: "a b c d a b"}, {1: refs}) == \
        pytest.approx((1 * 1 * 3 / 4 * 1 / 3) ** 0.25 * math.exp(1 - 7 / 6), rel=1e-9)
    # "a a a b" against two references with two a's each: a clipped to 2 (3/4), aa to 1 (2/3),
    # aab 1/2, aaab 0/1; longer than both references: no brevity penalty
    tiny, small = 1e-15, 1e-9
    assert evaluate.bleu4({1: "a a a b"}, {1: ["a a b", "b a a"]}) == \
        pytest.approx(((3 + tiny) / (4 + small) * (2 + tiny) / (3 + small)
                       * (1 + tiny) / (2 + small) * tiny / (1 + small)) ** 0.25, rel=1e-9)
    # a corpus of two images: lengths (4 + 5 = 9 against 7 + 5 = 12) and n-gram counts summed before
    # the ratios; every n-gram matches, so only the corpus's brevity penalty remains
    assert evaluate.bleu4({1: "a b c d", 2: "e f g h i"},
                          {1: ["a b c d x y z"], 2: ["e f g h i"]}) == \
        pytest.approx(math.exp(1 - 12 / 9), rel=1e-9)
    with pytest.raises(KeyError, match="no reference captions for image 3"):
        evaluate.bleu4({3: "a b"}, {1: ["a b"]})


def gt_predictions(ds):
    """The split's ground truth in model.predict's output format (original pixels)."""
    preds = {}
    for i, image_id in enumerate(ds.ann.image_ids.tolist()):
        _, W, H = ds.ann.image(i)
        boxes, labels, segs = ds.ann.objects(i)
        masks = (torch.stack([torch.from_numpy(data.decode_segmentation(s, H, W)).bool()
                              for s in segs])
                 if len(segs) else torch.zeros(0, H, W, dtype=torch.bool))
        p_boxes, kpts = ds.ann.persons(i)
        kpt_index = [next(k for k, b in enumerate(boxes.tolist()) if b == p)
                     for p in p_boxes.tolist()]
        preds[image_id] = dict(boxes=torch.from_numpy(boxes).float(), scores=torch.ones(len(boxes)),
                               labels=torch.from_numpy(labels), masks=masks,
                               keypoints=torch.from_numpy(kpts),
                               kpt_index=torch.tensor(kpt_index, dtype=torch.long),
                               caption=ds.ann.captions(i)[0])
    return preds


def test_ground_truth_as_predictions_scores_ap_100_through_the_result_writing_path(
        synth, tokenizer):
    """Evaluation: the ground truth written as COCO results scores AP 100 for each task and
    BLEU-4 1."""
    ds = data.CocoMultiTask(synth, "val2017", tiny_cfg(), tokenizer, train=False)
    preds = gt_predictions(ds)
    ids = ds.ann.image_ids.tolist()
    res = evaluate.to_coco_results([preds[i] for i in ids], ids, ds.categories)
    for task, iou_type in (("det", "bbox"), ("seg", "segm"), ("kpt", "keypoints")):
        assert (evaluate.coco_ap(ds.coco_files[task], res[iou_type], iou_type, ids)[0]
                == pytest.approx(100.0))
    assert (evaluate.bleu4(res["captions"], {i: ds.ann.captions(k) for k, i in enumerate(ids)})
            == pytest.approx(1.0))


@pytest.fixture(scope="session")
def trained(synth, tmp_path_factory):
    """A tiny checkpoint after 3 training steps (one epoch of the small set)."""
    out = tmp_path_factory.mktemp("trained")
    train.main(run_args(str(synth), out, "--max-steps", "3"))
    return out / "last.pt"


def test_distributed_evaluation_does_not_depend_on_the_number_of_processes(
        synth, trained, tmp_path):
    """Evaluation on 1 and on 3 processes gives the same metrics and results.

    8 val images on 1 process and on 3 (8 = 3 + 3 + 2: a padding sampler would repeat one)."""
    common = [str(trained), "--data", synth, "--device", "cpu", "--workers", "0",
              "--batch-size", "2"]
    run([sys.executable, "evaluate.py", *common, "--out", str(tmp_path / "one")])
    run(torchrun(3, "evaluate.py", *common, "--out", str(tmp_path / "three")))
    one, three = (json.load(open(tmp_path / d / "metrics.json")) for d in ("one", "three"))
    for m in (one, three):
        del m["ms_per_image"]
    assert one == three and one["num_images"] == 8
    assert (json.load(open(tmp_path / "one/captions_results.json"))
            == json.load(open(tmp_path / "three/captions_results.json")))
    boxes = [json.load(open(tmp_path / d / "bbox_results.json")) for d in ("one", "three")]
    assert ([(r["image_id"], r["category_id"]) for r in boxes[0]]
            == [(r["image_id"], r["category_id"]) for r in boxes[1]])
    # other batches
    assert np.allclose([r["score"] for r in boxes[0]], [r["score"] for r in boxes[1]], atol=1e-5)


def test_own_images_give_pictures_and_jsonl_without_annotations(synth, trained, tmp_path):
    """README: evaluate.py --images writes a picture per image and predictions.jsonl, without
    annotations.

    README, own images: one picture per input image (photo3.jpg and photo3.png both get theirs)
    and predictions.jsonl whose masks are COCO RLEs of the image's size that decode to the
    predicted masks."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in (1, 2, 3):
        shutil.copy(f"{synth}/val2017/{i:012d}.jpg", folder / f"photo{i}.jpg")
    # gray, other size
    Image.open(folder / "photo3.jpg").convert("L").resize((200, 90)).save(folder / "photo3.png")
    run([sys.executable, "evaluate.py", str(trained), "--images", str(folder), "--device", "cpu",
         "--out", str(tmp_path / "out"), "--batch-size", "2", "--score-thresh", "0"])
    lines = [json.loads(l) for l in open(tmp_path / "out/predictions.jsonl")]
    pictures = ["photo1.jpg.png", "photo2.jpg.png", "photo3.jpg.png", "photo3.png.png"]
    assert ([r["picture"] for r in lines] == pictures
            and all(os.path.exists(tmp_path / "out" / p) for p in pictures))
    names = {c["name"] for c in
             json.load(open(f"{synth}/annotations/instances_val2017.json"))["categories"]}
    for rec in lines:
        assert (len(rec["boxes"]) == len(rec["scores"]) == len(rec["labels"]) > 0
                and set(rec["labels"]) <= names)
        assert isinstance(rec["caption"], str) and "keypoints" in rec
        W, H = Image.open(rec["image"]).size
        # decoded back
        assert evaluate.rle_to_masks(rec["masks"], H, W).shape == (len(rec["boxes"]), H, W)
    gray = lines[3]
    assert max(b[2] for b in gray["boxes"]) <= 200 and max(b[3] for b in gray["boxes"]) <= 90
    assert Image.open(tmp_path / "out/photo3.png.png").size[0] == 200
    # the jsonl masks are the predicted masks, kept ones only, in box order
    masks = torch.rand(5, 9, 13) > 0.5
    p = dict(boxes=torch.rand(5, 4), scores=torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2]),
             labels=torch.zeros(5, dtype=torch.long), masks=masks)
    rec = evaluate.prediction_record("x.jpg", p, [dict(id=1, name="person")], 0.5)
    assert torch.equal(evaluate.rle_to_masks(rec["masks"], 9, 13), masks[[0, 2, 3]])


def test_checkpoint_round_trip_gives_identical_predictions(synth, tokenizer, tmp_path):
    """A checkpoint round trip keeps categories and tokenizer and gives identical predictions."""
    ds = data.CocoMultiTask(synth, "val2017", tiny_cfg(), tokenizer, train=False)
    model = save_random_checkpoint(tmp_path / "c.pt", ds, tokenizer)
    ckpt = runtime.load_checkpoint(str(tmp_path / "c.pt"))
    loaded, tok = runtime.model_from_checkpoint(ckpt)
    assert ckpt["categories"] == ds.categories and tok.model_bytes == tokenizer.model_bytes
    batch = data.collate([ds[i] for i in range(3)])
    args = (batch["images"], batch["padding"], batch["orig_size"])
    with torch.no_grad():
        a, b = model.predict(*args, tokenizer=tokenizer), loaded.predict(*args, tokenizer=tok)
    for x, y in zip(a, b):
        for k in x:
            assert (torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]), k


def test_single_task_runs_train_and_evaluate_only_their_task(synth, tmp_path, monkeypatch):
    """Table 8: a single-task run trains and evaluates only its task (segmentation: oracle box
    prompts).

    Table 8, --tasks: a segmentation-only model trains only segmentation and evaluates only masks,
    prompted by the ground-truth boxes (an oracle: it has no detector), one mask per object; a
    caption-only model trains and evaluates only captions."""
    decoded = []
    spy(monkeypatch, mad.MAD, "log_probs", lambda self, p, i, e, task: decoded.append(task))
    train.main(run_args(synth, tmp_path / "seg", "--tasks", "seg", "--max-steps", "2"))
    assert (set(decoded) == {"seg"}
            and set(json.loads(open(tmp_path / "seg/log.jsonl").readline())) >= {"loss", "seg"})
    assert not {"det", "kpt", "cap"} & set(json.loads(open(tmp_path / "seg/log.jsonl").readline()))
    run([sys.executable, "evaluate.py", str(tmp_path / "seg/last.pt"), "--device", "cpu",
         "--workers", "0", "--out", str(tmp_path / "seg/eval")])
    m = json.load(open(tmp_path / "seg/eval/metrics.json"))
    assert ("segm_AP" in m and not {"bbox_AP", "keypoints_AP", "BLEU4"} & set(m)
            and "oracle" in m["prompts"])
    segm = json.load(open(tmp_path / "seg/eval/segm_results.json"))
    gt = load_json(Path(synth) / "annotations/instances_val2017.json")["annotations"]
    assert (sorted((r["image_id"], r["category_id"]) for r in segm)
            == sorted((a["image_id"], a["category_id"]) for a in gt))
    assert all(r["score"] == 1.0 for r in segm)
    train.main(run_args(synth, tmp_path / "cap", "--tasks", "cap", "--max-steps", "1"))
    assert (set(json.loads(open(tmp_path / "cap/log.jsonl").readline()))
            - {"step", "epoch", "lr", "images_per_s"} == {"loss", "cap"})


# =============================================================================
# Training guarantees: schedule, resume, accumulation, precision, processes, presets, end to end

def test_learning_rate_schedule_at_chosen_steps():
    """Schedules: linear warm-up, then the x0.1 step drop or a cosine to 0 (values by hand).

    Schedules: linear warm-up (step + 1) / warmup; the paper's x0.1 from epoch lr_drop on; or a
    cosine from the end of the warm-up (and of a hold at the full rate) to 0 at the last step."""
    step = train.TrainConfig(warmup=4, lr_drop=(2,), lr_schedule="step")
    assert ([train.lr_factor(s, 20, 5, step) for s in (0, 1, 2, 3, 4, 9, 10, 19)]
            == [0.25, 0.5, 0.75, 1, 1, 1, 0.1, 0.1])
    # the authors' Swin-B schedule: x0.1, then x0.01
    two = train.TrainConfig(warmup=0, lr_drop=(2, 3), lr_schedule="step")
    assert ([train.lr_factor(s, 20, 5, two) for s in (0, 9, 10, 14, 15, 19)]
            == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01]))
    cos = train.TrainConfig(warmup=4, lr_schedule="cosine")
    got = [train.lr_factor(s, 14, 5, cos) for s in (3, 4, 6, 9, 14)]
    assert np.allclose(got, [1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 2 / 10)), 0.5, 0.0])
    held = train.TrainConfig(warmup=4, hold=3, lr_schedule="cosine")
    got = [train.lr_factor(s, 17, 5, held) for s in (3, 4, 6, 7, 12, 17)]
    assert np.allclose(got, [1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    # a drop at epoch 0
    assert train.lr_factor(0, 10, 5, train.TrainConfig(warmup=0, lr_drop=(0,))) == 0.1


def test_the_demo_is_one_fixed_run_on_every_machine_and_repeats_exactly(synth, tmp_path):
    """--demo is one fixed run: the same steps and batch on any device; the log prints the time
    left.

    The demo's plan is flags, not a measurement: batch 8, 1,800 steps, a 100-step warm-up, 200 at
    the full rate, then the cosine, on a CPU and on a GPU alike (only the data workers, which change
    the speed and never the run, differ). Two runs of the same short demo command end with the same
    weights, and the log line shows the ETA."""
    cpu = train.parse_args(["--demo", "--device", "cpu"])[1]
    gpu = train.parse_args(["--demo", "--device", "cuda"])[1]
    for tc in (cpu, gpu):
        assert ((tc.batch_size, tc.max_steps, tc.warmup, tc.hold, tc.lr_schedule)
                == (8, 1800, 100, 200, "cosine"))
    assert cpu.workers == 1 and gpu.workers >= 1
    assert train.parse_args(["--demo", "--max-steps", "90", "--device", "cpu"])[1].max_steps == 90
    outs = []
    for k in range(2):
        out = tmp_path / f"demo{k}"
        p = run([sys.executable, "-c",
                 f"import runtime, train; runtime.SYNTHETIC['root'] = {synth!r}; "
                 f"train.main(['--demo', '--max-steps', '3', '--log-every', '1', "
                 f"'--batch-size', '4', '--device', 'cpu', '--show', '0', '--out', {str(out)!r}])"])
        assert "ETA" in p.stdout and "step 3/3" in p.stdout
        outs.append(torch.load(out / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gradient_clipping_limits_the_update_to_the_clip_norm(synth, tokenizer, precision):
    """Training: gradients are clipped to a total norm of `clip`: the SGD update's norm is the clip.

    Training: gradients are clipped to a total norm of `clip` (0.1 in the paper presets) over all
    parameters: with SGD at lr 1 the update is the clipped gradient, whose norm is exactly the
    clip. With fp16 the GradScaler's scale (here 2^10) is taken off the gradients before they
    are clipped: clipping the scaled ones would leave an update of clip / 2^10."""
    cfg = tiny_cfg()
    ds = data.CocoMultiTask(synth, "val2017", cfg, tokenizer, train=False)
    batch = data.collate([ds[i] for i in range(2)])
    torch.manual_seed(0)
    model = MAD(cfg, ds.vocab)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    fp16 = precision == "fp16"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=fp16)
    autocast = torch.autocast("cpu", dtype=torch.float16) if fp16 else contextlib.nullcontext()
    train.train_step(model, model, [batch], ds.tasks, opt, scaler, autocast, clip=0.01)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-3)


def lrs(ckpt):
    return [g["lr"] for g in ckpt["optimizer"]["param_groups"]]


def assert_same_params(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


@pytest.mark.parametrize("option", [[], ["--accum-steps", "2"], ["--amp"]],
                         ids=["plain", "accumulation", "amp"])
def test_resume_continues_exactly_like_an_uninterrupted_run(synth, tmp_path, option):
    """README: a run resumed mid-epoch ends exactly like an uninterrupted run (plain, accumulation,
    AMP).

    README, exact resume: stopped mid-epoch after step 2 and resumed, a run (augmented; with
    gradient accumulation; under bf16 autocast) ends at step 5, an epoch later, with the parameters,
    Adam state, RNG state and learning rates of an uninterrupted run; its log has each step once,
    with the scheduled learning rate (2 warm-up steps, x0.1 from epoch 1 at step 3)."""
    flags = ["--warmup", "2", *option]
    train.main(run_args(synth, tmp_path / "straight", "--max-steps", "5", *flags))
    train.main(run_args(synth, tmp_path / "resumed", "--max-steps", "2", *flags))
    assert torch.load(tmp_path / "resumed/last.pt", weights_only=True)["step"] == 2
    train.main(run_args(synth, tmp_path / "resumed", "--max-steps", "5", "--resume", *flags))
    a = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 5 and lrs(a) == lrs(b)
    assert_same_params(a["model"], b["model"], atol=1e-6)
    # Adam's state ...
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert sa["step"] == sb["step"] == 5
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], atol=1e-9)
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-12)
    # ... and the RNG: a next resume continues too
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    log = [json.loads(l) for l in open(tmp_path / "resumed/log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    # tiny: lr 5e-4
    assert np.allclose([r["lr"] for r in log], [2.5e-4, 5e-4, 5e-4, 5e-5, 5e-5], rtol=1e-9)


def test_resume_restores_the_runs_settings_and_refuses_a_flag_that_would_change_the_run(
        synth, tmp_path, capsys):
    """--resume continues with the run's own settings and refuses a flag that would change the run.

    --resume continues the run with its own settings: a flag that would change it (--lr,
    --batch-size, a smaller --max-steps) is refused with a message naming it; workers, logging and a
    longer --max-steps may change. The same command started again continues the run; another command
    on the same --out is refused, so its checkpoint is never overwritten."""
    out = tmp_path / "run"
    train.main(run_args(synth, out, "--max-steps", "2", "--lr", "3e-4"))
    for flags, match in ((["--lr", "1e-3"], "--lr 0.0003 there, 0.001 here"),
                         (["--batch-size", "4"], "--batch-size 8 there, 4"),
                         (["--max-steps", "1"], "--max-steps 2 there, 1 here")):
        with pytest.raises(SystemExit, match=match + ".*would change the run"):
            train.main(["--out", str(out), "--resume", *flags])
    with pytest.raises(SystemExit, match="holds a run with other settings"
                                         ".*--lr 0.0003 there, 0.0005 here.*--resume"):
        train.main(run_args(synth, out, "--max-steps", "2"))    # the default lr: another run
    capsys.readouterr()
    train.main(["--out", str(out), "--resume", "--workers", "1", "--log-every", "2",
                "--max-steps", "4"])
    assert "resumed at step 2" in capsys.readouterr().out
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["train"]["lr"] == 3e-4 and ckpt["train"]["batch_size"] == 8
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1, 2, 4]
    # the same command, longer: continues
    train.main(run_args(synth, out, "--max-steps", "5", "--lr", "3e-4"))
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5
    with pytest.raises(SystemExit, match="--resume: no checkpoint at"):
        train.main(["--out", str(tmp_path / "nothing"), "--resume"])


def test_accumulated_micro_batches_equal_one_batch_k_times_the_size(synth, tokenizer):
    """Accumulation: 2 micro-batches of 2 give the step of one batch of 4.

    train_step over 2 micro-batches of 2 == over one batch of 4, in float64 (in float32 the
    two summation orders differ by ~3e-5 relative; float64 shows the normalization is exact)."""
    # masks are then the same however the batch is split
    cfg = tiny_cfg(mask_ratio=1.0, cap_full_word=False)
    ds = data.CocoMultiTask(synth, "val2017", cfg, tokenizer, train=False)
    samples = [ds[i] for i in range(4)]
    steps = []
    for micro_batches in ([data.collate(samples)],
                          [data.collate(samples[:2]), data.collate(samples[2:])]):
        torch.manual_seed(0)
        model = MAD(cfg, ds.vocab).double()                  # (uint8 images, normalized in float64)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        losses = train.train_step(model, model, micro_batches, ds.tasks, opt,
                                  torch.amp.GradScaler("cpu", enabled=False),
                                  contextlib.nullcontext(), clip=1e9)
        steps.append((losses, {k: v - init[k] for k, v in model.state_dict().items()}))
    (l1, g1), (l2, g2) = steps
    assert torch.allclose(l1, l2, rtol=1e-6)                # (train_step reports float32 losses)
    assert max(g.abs().max() for g in g1.values()) > 0.1
    assert_same_params(g1, g2, atol=1e-10)


def test_accumulation_counts_the_positions_its_random_masks_actually_use(
        synth, tokenizer, monkeypatch):
    """Accumulation: each micro-batch's counting pass replays the random masks of its real pass.

    With random masks (ratio 0.7) the counting pass of each micro-batch must replay exactly the
    masks of its real pass: the positions counted first are the positions the loss then uses."""
    cfg = tiny_cfg()
    ds = data.CocoMultiTask(synth, "train2017", cfg, tokenizer, train=True)
    micro_batches = [data.collate([ds[i] for i in range(k, k + 3)]) for k in (0, 3, 6)]
    torch.manual_seed(0)
    model = MAD(cfg, ds.vocab)
    calls = []                                              # (grad enabled, counts) of each pass
    spy(monkeypatch, model, "forward", lambda out, batch, tasks: calls.append(
        (torch.is_grad_enabled(), {t: c.clone() for t, c in out[1].items()})), with_result=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rng = torch.get_rng_state()
    train.train_step(model, model, micro_batches, ds.tasks, opt,
                     torch.amp.GradScaler("cpu", enabled=False),
                     contextlib.nullcontext(), clip=1.0)
    # 3 counting passes, then 3 real ones
    assert [grad for grad, _ in calls] == [False] * 3 + [True] * 3
    for (_, counted), (_, used) in zip(calls[:3], calls[3:]):
        for t in ds.tasks:
            assert torch.equal(counted[t], used[t]), t
    # the check can fail: micro-batch 2 under micro-batch 1's masks counts different positions
    torch.set_rng_state(rng)
    with torch.no_grad():
        other = model(micro_batches[1], ds.tasks)[1]
    assert any(not torch.equal(other[t], calls[4][1][t]) for t in ds.tasks)


def test_amp_on_the_cpu_trains_under_bf16_autocast(synth, tmp_path, monkeypatch):
    """README: --amp on the CPU trains under bf16 autocast, with a finite loss and a checkpoint.

    README: --amp on the CPU trains under bf16 autocast: one step through train.py runs the model
    under it and gives a finite loss and a checkpoint."""
    seen = []
    spy(monkeypatch, mad.MAD, "forward",
        lambda self, batch, tasks: seen.append((torch.is_autocast_enabled("cpu"),
                                                torch.get_autocast_dtype("cpu"))))
    train.main(run_args(synth, tmp_path / "amp", "--amp", "--max-steps", "1"))
    assert seen == [(True, torch.bfloat16)]
    log = [json.loads(l) for l in open(tmp_path / "amp/log.jsonl")]
    assert len(log) == 1 and all(math.isfinite(log[0][k]) and log[0][k] > 0
                                 for k in ("loss", *mad.TASKS))
    ckpt = torch.load(tmp_path / "amp/last.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["train"]["amp"] is True
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_automatic_precision_bf16_where_native_fp16_with_a_grad_scaler_before_and_none_on_the_cpu(
        monkeypatch):
    """AMP: bf16 from compute capability 8, fp16 with a GradScaler before, none on the CPU unless
    --amp.

    AMP by default on CUDA: bf16 on GPUs of compute capability 8 and later, fp16 (with a GradScaler)
    before (a V100's or T4's bf16 is emulated); --no-amp: fp32. On the CPU fp32 unless --amp (bf16).
    The capability is faked, so this runs without a GPU."""
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cc"])
    for cc, want in (((7, 0), torch.float16), ((7, 5), torch.float16),
                     ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        capability["cc"] = cc
        assert (runtime.autocast_dtype("cuda:0", None) == want
                and runtime.autocast_dtype("cuda:0", True) == want)
        assert runtime.autocast_dtype("cuda:0", False) is None
    assert (runtime.autocast_dtype("cpu", None) is None
            and runtime.autocast_dtype("cpu", True) == torch.bfloat16)
    assert train.parse_args(["--backbone", "r50"])[1].amp is None          # auto


def test_training_and_evaluation_on_a_gpu_apply_tf32_and_turn_cudnn_attention_off(
        monkeypatch, tmp_path):
    """GPU settings: train.py and evaluate.py on CUDA turn TF32 on and cuDNN attention off, first
    thing.

    The GPU is faked, as the precision test fakes its compute capability: with the device "cuda",
    both scripts call runtime.cuda_settings before they read any data (a stand-in stops them there).
    The settings themselves, run for real: TF32 matmuls and convolutions on (the paper's A100s), and
    cuDNN's attention off, which would build a plan for every new multi-scale shape."""
    cuda_settings, called = runtime.cuda_settings, []

    class Stop(Exception):
        pass

    def stand_in():
        called.append(True)
        raise Stop
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "init_processes", lambda device, timeout=0: (0, 1, "cuda:0"))
    monkeypatch.setattr(runtime, "cuda_settings", stand_in)
    with pytest.raises(Stop):
        train.main(["--backbone", "tiny", "--device", "cuda", "--out", str(tmp_path / "run"),
                    "--data", str(tmp_path / "nothing")])
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(tmp_path / "none.pt"), "--device", "cuda"])
    with pytest.raises(Stop):
        evaluate.main()
    assert called == [True, True]
    matmul, cudnn, sdp = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.backends.cuda.cudnn_sdp_enabled())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.enable_cudnn_sdp(True)
        cuda_settings()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.backends.cuda.enable_cudnn_sdp(sdp)


def test_fp16_steps_with_a_grad_scaler_train_skip_an_overflow_and_stop_on_a_non_finite_loss(
        synth, tokenizer):
    """fp16 with a GradScaler trains, skips a step that overflows, and stops on a non-finite loss.

    The fp16 path (pre-Ampere GPUs), here on the CPU: under fp16 autocast with an enabled GradScaler
    a few steps train; a step whose scaled gradients overflow is skipped (weights unchanged) and the
    scale halves; a non-finite loss skips the update and is returned, which stops train.py."""
    cfg = tiny_cfg()
    ds = data.CocoMultiTask(synth, "val2017", cfg, tokenizer, train=False)
    batch = data.collate([ds[i] for i in range(2)])
    torch.manual_seed(0)
    model = MAD(cfg, ds.vocab)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    fp16 = torch.autocast("cpu", dtype=torch.float16)
    params = lambda: torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    before = params()
    losses = [train.train_step(model, model, [batch], ds.tasks, opt, scaler, fp16, clip=1.0)
              for _ in range(3)]
    assert all(torch.isfinite(l).all() for l in losses) and not torch.equal(params(), before)
    assert scaler.get_scale() == 2.0 ** 10                      # no overflow yet
    scaler.update(new_scale=2.0 ** 16)                          # the fp16 gradients overflow
    before = params()
    losses = train.train_step(model, model, [batch], ds.tasks, opt, scaler, fp16, clip=1.0)
    assert (torch.isfinite(losses).all() and torch.equal(params(), before)
            and scaler.get_scale() == 2.0 ** 15)
    for _ in range(6):                                          # the scale halves until steps fit
        train.train_step(model, model, [batch], ds.tasks, opt, scaler, fp16, clip=1.0)
        if not torch.equal(params(), before):
            break
    assert not torch.equal(params(), before) and scaler.get_scale() < 2.0 ** 15  # training goes on
    before, forward = params(), model.forward
    model.forward = lambda b, tasks: (
        lambda s, c: ({t: v * float("inf") for t, v in s.items()}, c))(*forward(b, tasks))
    losses = train.train_step(model, model, [batch], ds.tasks, opt, scaler, fp16, clip=1.0)
    assert not torch.isfinite(losses).all() and torch.equal(params(), before)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous checkpoint whole and loadable."""
    path = str(tmp_path / "last.pt")
    runtime.save_checkpoint(path, dict(step=1, w=torch.ones(3)))

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint(path, dict(step=2, w=torch.zeros(3)))
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_non_finite_loss_stops_naming_step_and_task_and_keeps_the_last_checkpoint(
        synth, tmp_path, monkeypatch):
    """A non-finite loss stops training naming its step and task; the last checkpoint stays,
    finite."""
    calls = {"n": 0}
    seg_loss = mad.LOSSES["seg"]

    def poisoned(model, batch, enc):
        calls["n"] += 1
        sums, counts = seg_loss(model, batch, enc)
        return (sums * float("nan") if calls["n"] == 3 else sums), counts
    monkeypatch.setitem(mad.LOSSES, "seg", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3 \(epoch 0\): seg=nan"):
        train.main(run_args(synth, out, "--max-steps", "5", "--save-every", "1"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


NAN_AT_STEP_3 = """
import os, sys
sys.path.insert(0, {here!r})
import mad, train
log_probs, calls = mad.MAD.log_probs, [0]
def poisoned(self, prompt, inputs, enc, task):
    logp = log_probs(self, prompt, inputs, enc, task)
    if task == "det" and logp.requires_grad:                # the training passes only
        calls[0] += 1
        if calls[0] == 3 and os.environ.get("RANK", "1") == "1":
            logp = logp * float("nan")                      # NaN detection log-probs on rank 1 only
    return logp
mad.MAD.log_probs = poisoned
train.main(sys.argv[1:])
"""


def test_nan_detection_logits_stop_every_rank_cleanly_through_the_matcher(synth, tmp_path):
    """NaN detection log-probs stop every rank cleanly, through the Hungarian matcher; the
    checkpoint stays.

    NaN detection log-probs must not crash the Hungarian matcher (scipy could raise on
    one rank while the other hung in all-reduce). 1 process and 2 gloo processes (NaN on rank 1
    only): every rank stops at step 3 with the message naming the task; step 2's checkpoint
    stays."""
    script = tmp_path / "poisoned_train.py"
    script.write_text(NAN_AT_STEP_3.format(here=HERE))
    for name, launch in (("one", [sys.executable]), ("two", torchrun(2))):
        out = tmp_path / name
        p = run([*launch, str(script),
                 *run_args(synth, out, "--max-steps", "5", "--save-every", "1")],
                check=False, timeout=300)
        assert p.returncode != 0, p.stdout
        assert ("non-finite loss at step 3 (epoch 0): det=nan" in p.stderr
                and "ValueError" not in p.stderr), p.stderr
        if name == "two":                                                      # both ranks said so
            assert p.stderr.count("non-finite loss at step 3") == 2, p.stderr
        assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


def test_ddp_two_processes_equal_one_process_on_the_joined_batch(synth, tmp_path):
    """DDP: one step of 2 processes x 1 image equals one of 1 process x 2 images.

    One optimizer step: 2 gloo processes x 1 image == 1 process x 2 images (full masking and no
    word shown in the full caption copy, so the random masks cannot differ; no augmentation, so no
    image is padded differently; the same two images, as DistributedSampler deals them). Adam's
    first step is lr * sign(gradient) whatever the gradient's scale, so the loss normalization shows
    in the gradients, which the checkpoint holds as Adam's first moment (0.1 x the all-reduced
    gradient; a huge --clip, since clipping to norm 1 would hide a uniform scale error)."""
    flags = ["--mask-ratio", "1.0", "--no-cap-full-word", "--batch-size", "2", "--max-steps", "1",
             "--no-augment", "--lr", "1e-4", "--backbone-lr", "1e-4", "--clip", "1e9"]
    run([sys.executable, "train.py", *run_args(synth, tmp_path / "one"), *flags])
    run(torchrun(2, "train.py", *run_args(synth, tmp_path / "two"), *flags))
    one = torch.load(tmp_path / "one/last.pt", weights_only=True)
    two = torch.load(tmp_path / "two/last.pt", weights_only=True)
    assert len(two["rng"]) == 2 and two["step"] == one["step"] == 1
    moments = lambda c: [s["exp_avg"] for s in c["optimizer"]["state"].values()]
    biggest = max(m.norm() for m in moments(one))
    assert biggest > 1e-3
    # float32 summation order differs, and a ReLU whose input sits at 0 may open in one run only:
    # measured 6e-4 relative error at worst; a wrong loss normalizer gives tens of percent
    for a, b in zip(moments(one), moments(two)):
        if a.norm() > 1e-3 * biggest:                       # (the rest: gradients of float noise)
            assert (a - b).norm() <= 1e-2 * a.norm()
    flat = lambda c: torch.cat([m.flatten() for m in moments(c)])
    assert (flat(one) - flat(two)).norm() <= 1e-3 * flat(one).norm()
    # Adam's first step is lr * g / (|g| + eps): an element whose gradient is float noise (e.g. the
    # attention key biases: a softmax ignores a shift of all its scores) moves by +-lr in either
    # run, so a few elements may differ by up to 2 lr; all the others must be equal
    assert one["model"].keys() == two["model"].keys()
    diff = torch.cat([(one["model"][k].float() - two["model"][k].float()).abs().flatten()
                      for k in one["model"]])
    assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() <= 2e-4 + 1e-6


def test_one_gpu_per_process_under_cuda_visible_devices():
    """Each process takes its own GPU (CUDA_VISIBLE_DEVICES or LOCAL_RANK); too few GPUs is a clear
    error.

    Where the launcher gives each process its own GPU (CUDA_VISIBLE_DEVICES), a process sees one and
    takes it, whatever its LOCAL_RANK; otherwise it takes GPU LOCAL_RANK; more processes than GPUs
    is a clear error."""
    assert [runtime.gpu_index(r, 1) for r in (0, 3, 7)] == [0, 0, 0]
    assert [runtime.gpu_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    with pytest.raises(SystemExit, match="LOCAL_RANK 8, but this process sees 8 GPU"):
        runtime.gpu_index(8, 8)


def test_resume_on_another_number_of_processes_keeps_the_global_batch_and_the_data_position(
        synth, tmp_path):
    """Resuming on another number of processes keeps the global batch and the position in the data.

    A run saved by 2 processes (batch 6, stopped mid-epoch at step 2) resumes with 1 and with 3:
    each global step still reads the next 6 images of the epoch's permutation, now split 6 / 2+2+2,
    into the next epoch; the third process, which the run did not have, trains with its own RNG."""
    flags = ["--batch-size", "6", "--seed", "3"]                    # 24 images: 4 steps an epoch
    run(torchrun(2, "train.py", *run_args(synth, tmp_path / "saved", *flags, "--max-steps", "2")))
    for world in (1, 3):
        out = tmp_path / f"resumed{world}"
        shutil.copytree(tmp_path / "saved", out)
        script = tmp_path / f"record{world}.py"
        script.write_text(RECORD_ORDER.format(here=HERE, out=str(out)))
        launch = [sys.executable] if world == 1 else torchrun(world)
        p = run([*launch, str(script), "--out", str(out), "--resume", "--max-steps", "6"])
        assert ("resumed at step 2" in p.stdout
                and f"{world} process(es) x {6 // world} images" in p.stdout)
        assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
        steps = [recorded_steps(out, r, 6 // world) for r in range(world)]
        for k, s in enumerate(range(2, 6)):                                 # global steps 3..6
            epoch, pos = s // 4, 6 * (s % 4)
            perm = torch.randperm(24, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
            for r in range(world):
                assert steps[r][k] == (epoch, perm[pos + r: pos + 6: world]), (world, s, r)
        assert torch.load(out / "last.pt", weights_only=True)["step"] == 6


RESTART_AFTER_CHECKPOINT_2 = """
import os, signal, sys
sys.path.insert(0, {here!r})
import runtime, train
save_run = runtime.save_run
def save_then_die(*a, **k):
    save_run(*a, **k)
    if a[8] == 2 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)         # rank 1 dies once, after step 2's checkpoint
runtime.save_run = save_then_die
train.main(sys.argv[1:])
"""


def test_a_restarted_job_continues_from_its_checkpoint_and_ends_like_an_uninterrupted_run(
        synth, tmp_path):
    """torchrun --max-restarts: a restarted job continues from its checkpoint, ends like an
    uninterrupted run.

    torchrun --max-restarts 1 with rank 1 killed after the step-2 checkpoint (gloo): the restarted
    processes run the same command, continue from OUT/last.pt (steps 3..6, each logged once) and end
    with the parameters and Adam state of an uninterrupted 2-process run."""
    flags = ["--max-steps", "6", "--save-every", "1"]
    run(torchrun(2, "train.py", *run_args(synth, tmp_path / "straight", *flags)))
    script = tmp_path / "restart.py"
    script.write_text(RESTART_AFTER_CHECKPOINT_2.format(here=HERE))
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "--max-restarts=1", str(script), *run_args(synth, tmp_path / "restarted", *flags)])
    assert "resumed at step 2" in p.stdout
    assert ([json.loads(l)["step"] for l in open(tmp_path / "restarted/log.jsonl")]
            == [1, 2, 3, 4, 5, 6])
    a = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    b = torch.load(tmp_path / "restarted/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert_same_params(a["model"], b["model"], atol=1e-6)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-9)


SLOW_SCORING = """
import atexit, json, os, sys, time
sys.path.insert(0, {here!r})
import evaluate, train
print_metrics = evaluate.print_metrics
def slow(m):
    time.sleep(8)                                 # rank 0 scores for longer than the 6 s timeout
    print_metrics(m)
evaluate.print_metrics = slow
atexit.register(lambda: open(os.path.join({out!r}, "exit%s" % os.environ["RANK"]), "w")
                .write(str(time.time())))
train.main(sys.argv[1:])
"""


def test_no_process_waits_in_a_collective_while_rank_0_scores_and_all_leave_together(
        synth, tmp_path):
    """Timeouts: no process waits in a collective while rank 0 scores, and all processes leave
    together.

    --pg-timeout 0.1 (6 s) and an evaluation after each of 2 epochs whose scoring on rank 0 takes
    8 s: rank 1 waits for it outside the training's collectives (a side group with a long timeout),
    so the run neither times out nor hangs, and both processes leave within a second or two."""
    out = tmp_path / "slow"
    out.mkdir()
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCORING.format(here=HERE, out=str(out)))
    run(torchrun(2, str(script), *run_args(synth, out, "--pg-timeout", "0.1", "--eval-every", "1",
                                           "--max-steps", "6")))
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert ((out / "eval_epoch1/metrics.json").exists()
            and (out / "eval_epoch2/metrics.json").exists())
    leave = [float((out / f"exit{r}").read_text()) for r in (0, 1)]
    assert abs(leave[0] - leave[1]) < 2.5, leave


SMALL_SYNTHETIC = """
import sys
sys.path.insert(0, {here!r})
import runtime, train
runtime.SYNTHETIC = dict(root="data/synthetic", train=24, val=4)
train.main(sys.argv[1:])
"""


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_generate_their_data_share_out_or_say_which_path_is_not_shared(tmp_path):
    """Two nodes: both generate their data and train on a shared --out, or name the path that is not
    shared.

    torchrun --nnodes 2 (gloo, one process per node, on localhost): from the same checkout both
    nodes' first processes generate the synthetic set at once without clobbering each other (atomic
    rename) and train; from two copies with a relative --out, every process stops with a message
    naming the path that is not shared; with an --out both see, each copy has its own data and the
    run trains."""
    def copy_code(name):
        d = tmp_path / name
        d.mkdir()
        for f in ("mad.py", "data.py", "train.py", "evaluate.py", "runtime.py", "coco.py"):
            shutil.copy(os.path.join(HERE, f), d / f)
        (d / "small.py").write_text(SMALL_SYNTHETIC.format(here=str(d)))
        return d
    def two_nodes(dirs, out):
        port, procs = free_port(), []
        for node, d in enumerate(dirs):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   f"--node-rank={node}", "--nproc-per-node=1", f"--rdzv-endpoint=localhost:{port}",
                   "small.py", "--data", "synthetic", "--backbone", "tiny", "--no-pretrained",
                   "--out", str(out), "--device", "cpu", "--batch-size", "4", "--workers", "0",
                   "--max-steps", "2", "--spm-vocab", "60", "--log-every", "1"]
            procs.append(subprocess.Popen(cmd, cwd=d, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}))
        return [(p.wait(timeout=300), *p.communicate()) for p in procs]
    same = copy_code("same")
    results = two_nodes([same, same], "runs/two")
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-2000:]
    assert "2 process(es) x 2 images" in results[0][1]
    assert (same / "data/synthetic/annotations/captions_val2017.json").exists()
    # the losing copy was removed
    assert not [p for p in os.listdir(same / "data") if ".tmp-" in p]
    assert torch.load(same / "runs/two/last.pt", weights_only=True)["step"] == 2
    a, b = copy_code("a"), copy_code("b")
    for rc, stdout, stderr in two_nodes([a, b], "runs/two"):
        assert rc != 0 and "--out runs/two is not shared by every node" in stderr, stderr[-2000:]
    shared = tmp_path / "shared_out"
    for rc, stdout, stderr in two_nodes([a, b], shared):
        assert rc == 0, stderr[-2000:]
    assert (a / "data/synthetic").is_dir() and (b / "data/synthetic").is_dir()
    assert torch.load(shared / "last.pt", weights_only=True)["step"] == 2


COUNT_GRAPHS = """
import json, os, sys
sys.path.insert(0, {here!r})
import torch, train
from torch._inductor.compile_fx import compile_fx
graphs, after_step = {{}}, []
compile = torch.compile
# every graph of a compiled part passes through its backend
def counting(fn, *a, **k):
    name = (type(fn.__self__).__name__
            if hasattr(fn, "__self__") and isinstance(fn.__self__, torch.nn.Module)
            and fn.__name__ != "decode" else fn.__name__)
    def backend(gm, inputs):
        graphs[name] = graphs.get(name, 0) + 1
        return compile_fx(gm, inputs)
    return compile(fn, *a, backend=backend, **k)
torch.compile = counting
train_step = train.train_step
def step(*a, **k):
    out = train_step(*a, **k)
    after_step.append(dict(graphs))
    return out
train.train_step = step
train.main(sys.argv[1:])
json.dump(after_step, open(os.path.join({out!r}, "graphs%s.json" % os.environ["RANK"]), "w"))
"""


def test_compile_under_ddp_keeps_its_graphs_over_multi_scale_shapes_and_the_replicas_equal(
        synth, tmp_path):
    """--compile under DDP keeps at most 3 graphs per part over multi-scale shapes; the replicas
    stay equal.

    --compile with 2 gloo processes (DDP), multi-scale images and varying numbers of segmentation /
    keypoint sequences: at most 3 graphs per compiled part (the encoder layer, the decoder), none
    compiled after the first 3 steps, plain parameter names in the checkpoint, and the replicas
    equal at every checkpoint (train.py compares them). 1 encoder and 1 decoder layer keep inductor
    short."""
    out = tmp_path / "c"
    out.mkdir()
    script = tmp_path / "count.py"
    script.write_text(COUNT_GRAPHS.format(here=HERE, out=str(out)))
    run(torchrun(2, str(script), *run_args(synth, out, "--compile", "--enc-layers", "1",
                                           "--dec-layers", "1", "--batch-size", "4",
                                           "--image-size", "160", "--max-size", "224",
                                           "--max-steps", "6", "--save-every", "2")), timeout=900)
    for r in (0, 1):
        steps = json.load(open(out / f"graphs{r}.json"))
        assert len(steps) == 6 and set(steps[-1]) == {"EncoderLayer", "decode"}, steps[-1]
        assert all(n <= 3 for n in steps[-1].values()) and steps[2] == steps[-1], steps
    ckpt = torch.load(out / "last.pt", weights_only=True)
    plain = MAD(tiny_cfg(enc_layers=1, dec_layers=1, image_size=160, max_size=224),
                Vocab(**ckpt["vocab"]))
    assert ckpt["step"] == 6 and list(ckpt["model"]) == list(plain.state_dict())


def test_parse_args_presets_schedules_and_explicit_flags():
    """Paper presets set each backbone's schedule; explicit flags win; --demo trains without
    augmentation."""
    cfg, tc, _ = train.parse_args(["--backbone", "r50"])
    assert ((cfg.d_model, cfg.num_bins, tc.epochs, tc.lr_drop, tc.batch_size, tc.backbone_lr)
            == (256, 500, 50, (40,), 16, 1e-5))
    # the authors' recipe: plain coordinate embeddings, captions' (ensemble + new) / 2
    assert not cfg.sine_coords and cfg.remask_average == "halve" and not cfg.sample_captions
    cfg, tc, _ = train.parse_args(["--backbone", "swin_b"])
    assert (tc.epochs, tc.lr_drop, tc.warmup, tc.batch_size) == (304, (203, 264), 250, 32)
    assert train.parse_args(["--lr-drop", "3,7"])[1].lr_drop == (3, 7)
    cfg, tc, _ = train.parse_args(["--backbone", "vit_b"])
    assert (cfg.image_size, tc.epochs, tc.batch_size) == (1024, 100, 32)
    cfg, tc, _ = train.parse_args(["--demo", "--epochs", "3", "--cap-ratios", "1,0.5", "--no-amp"])
    assert (cfg.backbone == "tiny" and tc.data == "synthetic" and tc.epochs == 3
            and cfg.cap_ratios == (1.0, 0.5))
    # the demo trains without augmentation
    assert tc.amp is False and tc.demo and tc.augment is False
    assert train.parse_args(["--demo", "--augment"])[1].augment is True     # ... unless asked


def test_paper_presets_load_imagenet_weights_by_default_and_offline_say_how_to_go_on(
        synth, tmp_path, monkeypatch):
    """Paper presets start from ImageNet weights; offline, the message says how to go on.

    The paper presets start from ImageNet weights unless --no-pretrained: `train.py --backbone r50`
    fetches torchvision's ResNet-50 weights; without a network the message names --backbone-weights
    FILE and --no-pretrained. torchvision's weights API fetches through its own reference to
    load_state_dict_from_url: that one is patched (and counted, so the test never downloads)."""
    import torchvision.models._api
    import urllib.error
    calls = []

    def offline(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    assert (train.parse_args(["--backbone", "r50"])[1].pretrained
            and not train.parse_args(["--backbone", "tiny"])[1].pretrained)
    with pytest.raises(SystemExit, match="--backbone-weights FILE.*--no-pretrained"):
        train.main([a for a in run_args(synth, tmp_path / "r50", "--backbone", "r50",
                                        "--max-steps", "1", "--batch-size", "1")
                    if a != "--no-pretrained"])             # the preset's default
    assert len(calls) == 1 and "resnet50" in calls[0]
    backbone, _ = mad.BACKBONES["r50"]()
    with pytest.raises(SystemExit, match="cannot read a state dict"):
        runtime.load_backbone_weights(backbone, "r50", "/nonexistent/weights.pt")
    with pytest.raises(SystemExit, match="no ImageNet weights for backbone 'swin_b384'"
                                         ".*--backbone-weights FILE.*--no-pretrained"):
        runtime.load_backbone_weights(mad.BACKBONES["swin_b384"]()[0], "swin_b384")


def test_readme_quick_start_then_evaluation_commands_work_in_a_fresh_copy(tmp_path):
    """README: the quick start (train.py --demo) and then evaluate.py work in a fresh copy of the
    code.

    README: `python train.py --demo`, then `python evaluate.py runs/demo/last.pt`, in that order,
    in a copy of the code (data/ and runs/ land there, nothing stale is reused). Only the step count
    and the device are added; the checkpoint must name the data root it was trained next to."""
    readme = open(os.path.join(HERE, "README.md")).read()
    assert "python train.py --demo" in readme and "python evaluate.py runs/demo/last.pt" in readme
    clone = tmp_path / "clone"
    clone.mkdir()
    for f in ("mad.py", "data.py", "train.py", "evaluate.py", "runtime.py", "coco.py"):
        shutil.copy(os.path.join(HERE, f), clone / f)
    run([sys.executable, "train.py", "--demo", "--max-steps", "2", "--device", "cpu"], cwd=clone)
    assert (clone / "data/synthetic/annotations/captions_val2017.json").exists()
    assert (clone / "runs/demo/eval_final/metrics.json").exists()
    run([sys.executable, "evaluate.py", "runs/demo/last.pt", "--device", "cpu"], cwd=clone)
    m = json.load(open(clone / "runs/demo/eval/metrics.json"))
    assert (m["num_images"] == runtime.SYNTHETIC["val"]
            and {"bbox_AP", "segm_AP", "keypoints_AP", "BLEU4"} <= set(m))


# measured 100, 100, 100, 56.3
OVERFIT = dict(bbox_AP50=90, segm_AP50=80, keypoints_AP50=80, BLEU4=40)


def test_tiny_model_learns_all_four_tasks_on_eight_images(tmp_path):
    """End to end: the tiny model learns all four tasks on eight images (train.py, then
    evaluate.py).

    The whole method end to end: train.py overfits 8 synthetic images (no augmentation) and
    evaluate.py scores them. Catches what shape tests cannot: a model that ignores the image."""
    root = str(tmp_path / "eight")
    coco.make_synthetic_coco(root, 8, 1, seed=5)
    train.main(run_args(root, tmp_path / "run", "--no-augment", "--max-steps", "170",
                        "--epochs", "170", "--lr-drop", "170",
                        "--lr", "1e-3", "--backbone-lr", "1e-3"))
    ckpt = runtime.load_checkpoint(str(tmp_path / "run/last.pt"))
    model, tok = runtime.model_from_checkpoint(ckpt)
    ds = data.CocoMultiTask(root, "train2017", model.cfg, tok, train=False,
                            categories=ckpt["categories"])
    m = evaluate.evaluate(model, ds, tok, str(tmp_path / "eval"), batch_size=8)
    assert m["bbox_AP50"] >= OVERFIT["bbox_AP50"] and m["segm_AP50"] >= OVERFIT["segm_AP50"], m
    assert m["keypoints_AP50"] >= OVERFIT["keypoints_AP50"] and m["BLEU4"] >= OVERFIT["BLEU4"], m


def test_bench_quick_mode_prints_the_tiny_rows():
    """README: bench.py --quick prints the tiny rows: decoder passes of each method, times,
    throughput.

    README, bench.py --quick (seconds: tiny only, one repetition): the latency rows count the
    sequential decoder passes the paper compares (MAD: one per task, 8 with masked inference;
    AR: one per token, 5Q + M^2 + 51 + caption length), and the throughput rows are numbers."""
    p = run([sys.executable, "bench.py", "--quick", "--json"], timeout=300)
    res = json.loads(p.stdout)
    cfg = tiny_cfg()
    rows = res["latency_tiny"]
    assert ([rows[r]["passes"] for r in ("MAD one stage", "MAD masked inference", "AR + KV cache")]
            == [4, 1 + 1 + 2 + len(cfg.cap_ratios),   # keypoints: the paper's 2 stages
                5 * cfg.num_queries + cfg.grid_size ** 2 + 51 + cfg.caption_len])
    for r in rows.values():
        # the parts lie inside the total
        assert 0 < sum(r[t] for t in ("encode", *mad.TASKS)) <= r["total"]
    # Table 2: parallel is faster
    assert rows["AR + KV cache"]["total"] > 2 * rows["MAD one stage"]["total"]
    assert (res["train_tiny_b8_128"]["images_per_s"] > 0
            and res["flop_utilization_tiny"]["train_gflop"] > 1)
    assert "latency_r50" not in res and res["device"] == "cpu"


# =============================================================================
# Bad input: clear errors naming the file and field, or converted / skipped / counted

def copy_set(synth, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(synth, root)
    return root


def test_missing_annotation_file_disables_its_task_with_one_line(
        synth, tokenizer, tmp_path, capsys):
    """A missing annotation file disables its task with one line naming the file."""
    root = copy_set(synth, tmp_path)
    (root / "annotations/person_keypoints_val2017.json").unlink()
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False)
    out = capsys.readouterr().out.strip().splitlines()
    assert ds.tasks == ("det", "seg", "cap")
    assert (len(out) == 1 and "person_keypoints_val2017.json not found" in out[0]
            and "kpt disabled" in out[0])
    _, t = ds[0]
    assert not t["kpt_weight"].any()


@pytest.mark.parametrize("case,match", [
    ("unknown_category",
     r"instances_val2017.json: annotation \d+ has category_id 77, which is not in 'categories'"),
    ("not_json", r"instances_val2017.json: not JSON"),
    ("not_coco", r"instances_val2017.json: not a COCO instances file: no list 'annotations'"),
    ("no_bbox", r"instances_val2017.json: annotation \d+ has no field 'bbox'"),
    ("unknown_image", r"captions_val2017.json: annotation \d+ refers to image_id 4242"),
    ("zero_height", r"instances_val2017.json: image entry .* lacks an integer id, a positive width "
                    r"and height"),
])
def test_bad_annotation_files_name_the_file_and_field(synth, tokenizer, tmp_path, case, match):
    """Bad annotation files (not JSON, not COCO, a missing field, an unknown id) raise errors naming
    both."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/instances_val2017.json"
    d = load_json(path)
    if case == "unknown_category":
        d["annotations"][0]["category_id"] = 77
        path.write_text(json.dumps(d))
    elif case == "not_json":
        path.write_text("<html>404</html>")
    elif case == "not_coco":
        path.write_text(json.dumps({"images": []}))
    elif case == "no_bbox":
        del d["annotations"][0]["bbox"]
        path.write_text(json.dumps(d))
    elif case == "zero_height":
        d["images"][0]["height"] = 0
        path.write_text(json.dumps(d))
    else:
        path = root / "annotations/captions_val2017.json"
        c = load_json(path)
        c["annotations"][0]["image_id"] = 4242
        path.write_text(json.dumps(c))
    with pytest.raises(ValueError, match=match):
        data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False)


class RunsCode:
    """Unpickling this object creates a file: a harmless stand-in for a checkpoint's payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    """Checkpoints load weights-only: one holding an object (here one that writes a file when
    unpickled) is refused by evaluate.py with one line, and its code never runs; the project's
    own checkpoints hold only tensors and plain values (RNG states included)."""
    marker = tmp_path / "it ran"
    bad = tmp_path / "found_online.pt"
    torch.save(dict(model={}, config={}, vocab={}, categories=[], payload=RunsCode(str(marker))),
               bad)
    p = run([sys.executable, "evaluate.py", str(bad), "--device", "cpu"], check=False)
    assert p.returncode != 0 and not marker.exists()
    assert f"{bad}: refused: it holds Python objects" in p.stderr
    assert "Traceback" not in p.stderr


def test_numpy_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """numpy's RNG state, stored as tensors and plain values, resumes numpy's stream exactly
    after a weights-only load (a Gaussian drawn half-way included)."""
    np.random.seed(11)
    np.random.rand(7)
    np.random.randn()                            # leaves a cached Gaussian in the state
    state = runtime.rng_state("cpu")
    expected = (np.random.randn(), np.random.rand(5))
    torch.save(dict(rng=state), tmp_path / "s.pt")
    np.random.seed(99)
    runtime.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], "cpu")
    got = (np.random.randn(), np.random.rand(5))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1])


def rle_of(mask):
    """A (h, w) 0/1 array as a compressed COCO RLE with a str counts."""
    import pycocotools.mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=rle["size"], counts=rle["counts"].decode())


def test_unusable_masks_are_dropped_and_counted_when_read_and_uncompressed_rle_is_read(
        synth, tokenizer, tmp_path, capsys):
    """Polygons of fewer than 3 points (or empty) and RLEs that do not fit their image are
    dropped when the file is read, counted in one line naming an annotation; their objects keep
    their boxes, and every sample of the split then builds without a crash. An uncompressed RLE
    (counts as run lengths) reads as the same mask as its compressed form."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/instances_val2017.json"
    d = load_json(path)
    size = {im["id"]: (im["height"], im["width"]) for im in d["images"]}
    anns = d["annotations"]
    anns[0]["segmentation"] = [[1, 2, 3, 4]]                  # two points
    anns[1]["segmentation"] = [[]]
    H, W = size[anns[2]["image_id"]]
    anns[2]["segmentation"] = rle_of(np.ones((H + 5, W)))    # another size
    H, W = size[anns[3]["image_id"]]
    bad_runs = rle_of(np.ones((H, W)))
    bad_runs["counts"] = bad_runs["counts"] + bad_runs["counts"]   # runs past H x W pixels
    anns[3]["segmentation"] = bad_runs
    H, W = size[anns[4]["image_id"]]
    x, y, w, h = [int(round(v)) for v in anns[4]["bbox"]]
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y:y + h, x:x + w // 2] = 1                         # the box's left half
    runs, value = [0], 0                                     # column by column, 0s first
    for pixel in mask.flatten(order="F").tolist():
        if pixel != value:
            runs.append(0)
            value = pixel
        runs[-1] += 1
    anns[4]["segmentation"] = dict(size=[H, W], counts=runs)
    anns[5]["segmentation"] = [[10, 10, 30, 10, 30, 30, 10]]   # an odd number of values
    anns[6]["segmentation"] = [[10, 10, 30, 10, float("nan"), 30]]   # JSON's NaN
    kept = anns[7]["segmentation"][0]
    anns[7]["segmentation"] = [kept, [1, 2, 3, 4]]           # one polygon of two usable
    path.write_text(json.dumps(d))
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=True)
    out = capsys.readouterr().out
    assert "val2017: 7 objects lost a mask or part of one" in out
    assert f"annotation {anns[3]['id']}" in out and ds.ann.bad_masks == 7
    for a in anns[:8]:
        row = ds.ann.row(a["image_id"])
        boxes, _, segs = ds.ann.objects(row)
        k = [b.tolist() for b in boxes].index(
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
        if a is anns[4]:
            assert segs[k] == anns[4]["segmentation"]
            decoded = data.decode_segmentation(segs[k], H, W)
            assert np.array_equal(decoded, mask)
        elif a is anns[7]:
            assert len(segs[k]) == 1 and segs[k][0].tolist() == kept
        else:
            assert segs[k] is None                           # the box stays, without a mask
    for i in range(len(ds)):
        ds[i]
    with pytest.raises(SystemExit, match=r"annotation \d+: 'segmentation' has a polygon"):
        evaluate.check_ground_truth(ds.ann, ("det", "seg"))
    evaluate.check_ground_truth(ds.ann, ("det",))            # boxes alone are scored


def test_an_rle_is_kept_at_its_non_square_images_size_when_its_runs_cover_the_image(
        tmp_path, tokenizer, capsys):
    """An RLE mask is kept when its size is its image's [height, width] and its runs cover
    height x width pixels (compressed counts decoded as pycocotools does); on a 200 x 120 image
    an RLE of size [200, 120] is dropped and counted, and one that fits is read unchanged."""
    H, W = 120, 200
    root = write_coco(str(tmp_path / "set"), [dict(W=W, H=H, objects=[
        (3, rect(20, 30, 90, 100)), (5, rect(110, 10, 180, 60))])])
    path = Path(root) / "annotations/instances_val2017.json"
    d = load_json(path)
    fits = np.zeros((H, W), np.uint8)
    fits[30:100, 20:90] = np.random.default_rng(0).random((70, 70)) < 0.5   # many runs
    d["annotations"][0]["segmentation"] = rle_of(fits)
    d["annotations"][1]["segmentation"] = rle_of(np.ones((W, H)))          # [width, height]
    path.write_text(json.dumps(d))
    ds = data.CocoMultiTask(root, "val2017", tiny_cfg(), tokenizer, train=False)
    assert "1 objects lost a mask" in capsys.readouterr().out and ds.ann.bad_masks == 1
    _, labels, segs = ds.ann.objects(0)
    first, second = segs[list(labels).index(1)], segs[list(labels).index(2)]
    assert np.array_equal(data.decode_segmentation(first, H, W), fits) and second is None
    # the runs' total, by hand for run lengths; a cut string covers fewer pixels
    rle = rle_of(fits)
    assert coco.rle_pixels(rle) == H * W == coco.rle_pixels(dict(counts=[5, H * W - 5]))
    assert coco.rle_pixels(dict(rle, counts=rle["counts"][:-4])) not in (H * W,)


@pytest.mark.parametrize("field,value,expected", [
    ("bbox", ["10", 20, 30, 40], "numbers"),
    ("bbox", [10, None, 30, 40], "numbers"),
    ("bbox", None, r"\[x, y, width, height\]"),
    ("bbox", [1, 2, 3], r"\[x, y, width, height\]"),
    ("image_id", "3", "an integer"),
    ("id", None, "an integer"),
    ("category_id", 3.0, "an integer"),
    ("iscrowd", 2, "0 or 1"),
    ("segmentation", [[1, 2, "3", 4, 5, 6]], "polygons: lists of numbers"),
    ("segmentation", {"size": [10, "20"], "counts": "abc"},
     r"an RLE with size \[height, width\]"),
    ("segmentation", {"size": [10, 20], "counts": None}, "an RLE with counts"),
    ("segmentation", "a string", "polygons"),
    ("keypoints", None, "17 x 3 numbers"),
    ("keypoints", [0] * 50 + ["2"], "numbers"),
    ("keypoints", [0] * 50 + [None], "numbers"),
    ("caption", None, "a string"),
])
def test_annotations_of_the_wrong_type_are_refused_when_read_naming_file_id_and_field(
        synth, tokenizer, tmp_path, field, value, expected):
    """A value of the wrong type in an annotation is refused when the file is read (before any
    step), naming the file, the annotation id and the field."""
    root = copy_set(synth, tmp_path)
    kind = {"keypoints": "person_keypoints", "caption": "captions"}.get(field, "instances")
    path = root / f"annotations/{kind}_val2017.json"
    d = load_json(path)
    a = d["annotations"][1]
    a[field] = value
    path.write_text(json.dumps(d))
    shown_id = a["id"] if field != "id" else "None"
    with pytest.raises(ValueError, match=rf"{kind}_val2017.json: annotation {shown_id}: "
                                         rf"'{field}' is .*, expected {expected}"):
        data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False)


def test_non_finite_keypoints_are_refused_when_read(synth, tokenizer, tmp_path):
    """A keypoint value that is not a finite number (JSON's NaN) is refused naming the file and
    the annotation."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/person_keypoints_val2017.json"
    d = load_json(path)
    d["annotations"][0]["keypoints"][4] = float("nan")
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"person_keypoints_val2017.json: annotation "
                                         rf"{d['annotations'][0]['id']}: 'keypoints'"):
        data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False)


def test_evaluation_refuses_repeated_annotation_ids_before_predicting(synth, tmp_path):
    """pycocotools keeps one annotation per id: with repeated ids, ground truth would be lost and
    AP overstated. evaluate.py refuses such a val file before predicting, naming the ids."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/instances_val2017.json"
    d = load_json(path)
    repeated = d["annotations"][0]["id"]
    d["annotations"][3]["id"] = repeated
    path.write_text(json.dumps(d))
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), None, train=False)
    assert ds.ann.duplicate_ids == {"instances": [repeated], "person_keypoints": []}
    with pytest.raises(SystemExit, match=rf"instances_val2017.json: annotation ids \[{repeated}\] "
                                         rf"occur more than once"):
        evaluate.check_ground_truth(ds.ann, ds.tasks)
    # what it prevents: the ground truth submitted as results no longer scores 100
    results = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"],
                    score=1.0) for a in d["annotations"] if not a.get("iscrowd")]
    ids = sorted({a["image_id"] for a in d["annotations"]})
    assert evaluate.coco_ap(str(path), results, "bbox", ids)[0] < 99


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--mask-ratio", "1.5"], r"--mask-ratio 1.5: ratios must be in \(0, 1\]"),
    (["--mask-ratio", "-0.5"], r"--mask-ratio -0.5: ratios must be in \(0, 1\]"),
    (["--tasks", "det,foo"], "--tasks foo: choose one of det, seg, kpt, cap"),
    (["--decoder", "AR"], "--decoder AR: choose one of mad, ar"),
    (["--lr-schedule", "cosin"], "--lr-schedule cosin: choose one of step, cosine"),
    (["--batch-size", "-2"], "--batch-size -2: must be > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (["--accum-steps", "0"], "--accum-steps 0: must be > 0"),
    (["--backbone", "resnet18"], "--backbone resnet18: choose one of r50, swin_b"),
    (["--mask-strategy", "fixd"], "--mask-strategy fixd: choose one of fixed, random, multiple"),
    (["--remask-average", "mean"], "--remask-average mean: choose one of running, halve"),
    (["--num-bins", "0"], "--num-bins 0: must be > 0"),
    (["--cap-ratios", "1,0"], r"--cap-ratios 1.0,0.0: ratios must be in \(0, 1\]"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--device", "tpu"], "--device tpu: "),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible here; use --device cpu"),
    (["--batch-size", "6", "--accum-steps", "4"],
     "--batch-size 6 is not divisible by --accum-steps 4"),
])
def test_impossible_flags_stop_at_once_naming_the_flag_and_its_range_or_choices(
        tmp_path, flags, message, monkeypatch):
    """Every flag is checked before any data is read or generated: a COCO root that does not
    exist is never looked at, and nothing is written (on a host seen as without GPUs)."""
    read = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runtime, "prepare_data", lambda root: read.append(root))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        train.main(["--data", str(tmp_path / "no_coco"), "--out", str(out), *flags])
    assert not read and not out.exists()


def test_evaluate_py_checks_out_and_its_flags_before_predicting(trained, tmp_path):
    """--out that is a file, or a folder that cannot be written (Linux's /proc), and impossible
    flags stop evaluate.py before it predicts anything."""
    ckpt = str(trained)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(["--out", str(a_file)], f"--out {a_file}: cannot write there"),
             (["--out", str(a_file / "sub")], f"--out {a_file / 'sub'}: cannot write there"),
             (["--out", "/proc"], "--out /proc: cannot write there"),      # even as root
             (["--batch-size", "0"], "--batch-size must be >= 1"),
             (["--score-thresh", "2"], "--score-thresh must be in [0, 1]")]
    for flags, message in cases:
        p = run([sys.executable, "evaluate.py", ckpt, "--device", "cpu", *flags], check=False)
        assert p.returncode != 0 and message in p.stderr, p.stderr
        assert "evaluated" not in p.stdout and "Traceback" not in p.stderr


def test_evaluate_py_skips_an_unreadable_val_image_when_asked_and_scores_the_rest(
        synth, trained, tmp_path):
    """--skip-bad-images leaves an unreadable val image out, says so, and scores the others;
    without it evaluate.py stops naming the file."""
    shutil.copytree(synth, tmp_path / "set")
    (tmp_path / "set/val2017/000000000002.jpg").write_bytes(b"not a jpeg")
    base = [sys.executable, "evaluate.py", str(trained), "--device", "cpu",
            "--data", str(tmp_path / "set"), "--workers", "0"]
    p = run([*base, "--out", str(tmp_path / "strict")], check=False)
    assert p.returncode != 0 and "000000000002.jpg" in p.stderr
    p = run([*base, "--out", str(tmp_path / "skip"), "--skip-bad-images"])
    metrics = load_json(tmp_path / "skip/metrics.json")
    assert metrics["num_images"] == 7 and metrics["skipped_images"] == 1
    assert "1 unreadable images left out: scored on 7" in p.stdout
    scored = {r["image_id"] for r in load_json(tmp_path / "skip/bbox_results.json")}
    assert 2 not in scored


def test_own_images_are_turned_upright_by_exif_and_found_in_sub_folders(trained, tmp_path):
    """--images applies EXIF orientation (a phone's portrait photo is stored sideways with a
    tag) and searches sub-folders, mirroring them in --out."""
    photos = tmp_path / "photos"
    (photos / "trip/day2").mkdir(parents=True)
    stored = Image.new("RGB", (90, 40), (200, 30, 30))      # stored 90 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6                                          # rotate 90 degrees to view
    stored.save(photos / "trip/day2/portrait.jpg", exif=exif)
    Image.new("RGB", (50, 70), (30, 30, 200)).save(photos / "plain.png")
    out = tmp_path / "out"
    run([sys.executable, "evaluate.py", str(trained), "--device", "cpu",
         "--images", str(photos), "--out", str(out)])
    records = {r["picture"]: r for r in map(json.loads, open(out / "predictions.jsonl"))}
    assert set(records) == {"plain.png.png", "trip/day2/portrait.jpg.png"}
    with Image.open(out / "trip/day2/portrait.jpg.png") as picture:
        w, h = picture.size
    assert h > w                                              # upright: 40 wide, 90 high (scaled)
    with Image.open(out / "plain.png.png") as picture:
        assert picture.size[1] > picture.size[0]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file")],
                         ids=["OSError", "RuntimeError"])
def test_a_failed_save_removes_its_temporary_file_and_says_how_much_space_it_needs(
        tmp_path, monkeypatch, error):
    """A save that fails (a full disk) removes its partial temporary file, which would keep the
    disk full, and says how much space a save needs; the previous checkpoint stays. torch.save
    reports a full disk as an OSError or, from its zip writer, as a RuntimeError."""
    path = str(tmp_path / "last.pt")
    runtime.save_checkpoint(path, dict(step=1, w=torch.ones(3)))

    def disk_full(obj, f):
        f.write(b"x" * 1000)
        raise error
    monkeypatch.setattr(torch, "save", disk_full)
    said = re.escape(f"{type(error).__name__}: {error}")
    with pytest.raises(SystemExit, match=rf"could not save .*last.pt \({said}\); a save needs "
                                         rf"about 4 MB free in .*; .*last.pt still holds the "
                                         rf"previous save"):
        runtime.save_checkpoint(path, dict(step=2, w=torch.ones(2 ** 20)))
    assert not os.path.exists(path + ".tmp")
    assert torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_there"])
def test_an_unusable_tokenizer_file_stops_a_run_that_trains_captions(synth, tmp_path, damage):
    """An empty or truncated OUT/spm.model (a run stopped while writing it), or a --caption-spm
    file that is not there, stops the run naming the file: captioning is never silently off."""
    out = tmp_path / "run"
    out.mkdir()
    spm_bytes = data.train_caption_tokenizer(f"{synth}/annotations/captions_train2017.json",
                                             str(tmp_path / "good"), 60)
    extra = []
    if damage == "empty":
        (out / "spm.model").write_bytes(b"")
    elif damage == "truncated":
        (out / "spm.model").write_bytes(spm_bytes[: len(spm_bytes) // 2])
    else:
        extra = ["--caption-spm", str(tmp_path / "missing.model")]
    message = ("--caption-spm .*missing.model: no such file" if damage == "not_there"
               else r"spm.model: not a SentencePiece model: empty or truncated")
    with pytest.raises(SystemExit, match=message):
        train.main(run_args(synth, out, "--max-steps", "1", *extra))


def test_caption_spm_trains_with_the_given_model_and_checks_its_special_ids(synth, tmp_path):
    """--caption-spm FILE trains with that SentencePiece model (its pieces become the text
    vocabulary, none is trained), and a model whose pad/eos/unk ids are not 0/1/2 is refused."""
    import io
    import sentencepiece as spm
    captions = [c["caption"].lower() for c in
                load_json(Path(synth) / "annotations/captions_train2017.json")["annotations"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=model,
                                   vocab_size=45, model_type="bpe", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, num_threads=1, minloglevel=2,
                                   hard_vocab_limit=False)
    (tmp_path / "theirs.model").write_bytes(model.getvalue())
    out = tmp_path / "run"
    train.main(run_args(synth, out, "--max-steps", "1", "--caption-spm",
                        str(tmp_path / "theirs.model")))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["spm"] == model.getvalue() and not (out / "spm.model").exists()
    assert ckpt["vocab"]["num_text"] == mad.CaptionTokenizer(model.getvalue()).vocab_size
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=model,
                                   vocab_size=45, model_type="bpe", pad_id=3, eos_id=2, unk_id=0,
                                   bos_id=1, num_threads=1, minloglevel=2,
                                   hard_vocab_limit=False)
    (tmp_path / "other.model").write_bytes(model.getvalue())
    with pytest.raises(SystemExit, match=r"other.model: its special ids are \{'pad': 3, 'eos': 2, "
                                         r"'unk': 0\}; MAD's caption rows need"):
        train.main(run_args(synth, tmp_path / "run2", "--max-steps", "1", "--caption-spm",
                            str(tmp_path / "other.model")))

def test_missing_and_corrupt_images_name_the_file_or_are_skipped_and_counted(
        synth, tokenizer, tmp_path, capsys):
    """Missing and corrupt images raise errors naming the file, or are skipped and counted if
    asked."""
    root = copy_set(synth, tmp_path)
    (root / "val2017/000000000002.jpg").unlink()
    (root / "val2017/000000000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False)
    with pytest.raises(FileNotFoundError, match="000000000002.jpg"):
        ds[1]
    with pytest.raises(ValueError, match="cannot decode image .*000000000003.jpg"):
        ds[2]
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False,
                            skip_bad_images=True)
    ids = [ds[i][1]["image_id"] for i in range(len(ds))]
    # a next image stands in
    assert len(ds.skipped) == 2 and 2 not in ids and 3 not in ids and len(ids) == 8
    out = capsys.readouterr().out
    assert "000000000002.jpg" in out and "2 bad images skipped so far" in out


def test_skip_bad_images_through_train_py_with_a_data_worker(synth, tmp_path):
    """README: --skip-bad-images skips and counts bad images in a data worker; without it training
    stops.

    README: --skip-bad-images skips and counts missing and corrupt images, also in a data-loader
    worker process (--workers 1); without it training stops with an error naming the file."""
    root = copy_set(synth, tmp_path)
    (root / "train2017/000000000005.jpg").unlink()
    (root / "train2017/000000000009.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    flags = lambda out, *extra: run_args(str(root), tmp_path / out, "--workers", "1",
                                         "--max-steps", "3", *extra)
    with pytest.raises((FileNotFoundError, ValueError),
                       match=r"image file missing: .*000000000005.jpg|"
                             r"cannot decode image .*000000000009.jpg"):
        train.main(flags("strict"))
    # one epoch: every image is read
    p = run([sys.executable, "train.py", *flags("skip", "--skip-bad-images")])
    skipped = [l for l in p.stdout.splitlines() if l.startswith("skipping bad image")]
    assert (len(skipped) == 2 and "000000000005.jpg" in skipped[0] + skipped[1]
            and "000000000009.jpg" in skipped[0] + skipped[1])
    assert "2 bad images skipped so far" in skipped[1]
    assert torch.load(tmp_path / "skip/last.pt", weights_only=True)["step"] == 3


def test_grayscale_rgba_palette_and_tiny_images_become_rgb_samples(tmp_path, tokenizer):
    """Grayscale, RGBA, palette and tiny images become RGB samples; a tiny image is upscaled like
    any."""
    root = tmp_path / "modes"
    coco.make_synthetic_coco(str(root), 1, 4)
    d = load_json(root / "annotations/instances_val2017.json")
    src = Image.open(root / "val2017/000000000001.jpg")
    src.convert("L").save(root / "val2017/000000000001.jpg")
    src.convert("RGBA").save(root / "val2017/000000000002.jpg".replace(".jpg", ".png"))
    src.convert("P").save(root / "val2017/000000000003.jpg".replace(".jpg", ".png"))
    Image.new("RGB", (20, 12), (90, 90, 90)).save(root / "val2017/000000000004.jpg")
    for im in d["images"]:
        if im["id"] in (2, 3):
            im["file_name"] = im["file_name"].replace(".jpg", ".png")
        if im["id"] == 4:
            im["width"], im["height"] = 20, 12
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 4]
    d["annotations"].append(dict(id=999, image_id=4, category_id=3, iscrowd=0, bbox=[2, 2, 10, 6],
                                 segmentation=[[2, 2, 12, 2, 12, 8, 2, 8]], area=60.0))
    for kind in ("instances", "person_keypoints", "captions"):
        k = load_json(root / f"annotations/{kind}_val2017.json")
        k["images"] = d["images"]
        if kind == "instances":
            k = d
        else:
            k["annotations"] = [a for a in k["annotations"] if a["image_id"] != 4]
        (root / f"annotations/{kind}_val2017.json").write_text(json.dumps(k))
    for train_mode in (False, True):
        ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=train_mode)
        batch = data.collate([ds[i] for i in range(4)])
        assert batch["images"].shape[:2] == (4, 3) and torch.isfinite(batch["images"]).all()
    small, t = ds[3]
    assert min(small.shape[1:]) >= 32 and len(t["det_gt"]) == 1          # upscaled like any image


def test_degenerate_and_out_of_image_boxes_are_clipped_or_dropped_and_counted(
        synth, tokenizer, tmp_path, capsys):
    """Empty, out-of-image and crowd boxes are dropped and counted; a box partly outside is
    clipped."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/instances_val2017.json"
    d = load_json(path)
    a = d["annotations"][0]
    d["annotations"] += [dict(a, id=10**6, bbox=[10, 10, 0, 5]),           # zero area
                         dict(a, id=10**6 + 1, bbox=[500, 500, 20, 20]),   # outside the image
                         dict(a, id=10**6 + 2, bbox=[-20, -20, 40, 40]),   # partly outside: clipped
                         dict(a, id=10**6 + 3, iscrowd=1)]                 # crowd: not a target
    path.write_text(json.dumps(d))
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=False)
    assert (ds.ann.dropped == 3
            and "3 crowd, empty or out-of-image boxes dropped" in capsys.readouterr().out)
    i = ds.ann.row(a["image_id"])
    boxes = ds[i][1]["boxes"]
    assert ((boxes >= 0).all() and boxes[:, 2:].max() <= 128)
    assert any(torch.allclose(b, torch.tensor([0., 0., 20., 20.])) for b in boxes)


def test_person_with_all_keypoints_unlabelled_trains_no_keypoints(synth, tokenizer, tmp_path):
    """Persons with every keypoint unlabelled give no keypoint targets: a finite loss, its kpt
    part 0."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/person_keypoints_val2017.json"
    d = load_json(path)
    for a in d["annotations"]:
        a["keypoints"], a["num_keypoints"] = [0] * 51, 0
    path.write_text(json.dumps(d))
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=True)
    batch = data.collate([ds[i] for i in range(len(ds))])
    assert not batch["kpt_weight"].any() and batch["kpt_seq"].shape[1] == 1
    model = MAD(ds.cfg, ds.vocab)
    loss, parts = model.loss(batch)
    assert torch.isfinite(loss) and parts["kpt"] == 0


def test_empty_unicode_and_long_captions(synth, tokenizer, tmp_path):
    """Empty, Unicode and overlong captions give in-range caption targets, and BLEU-4 scores
    them."""
    root = copy_set(synth, tmp_path)
    path = root / "annotations/captions_val2017.json"
    d = load_json(path)
    d["annotations"][0]["caption"] = ""
    d["annotations"][1]["caption"] = "Ünïcödé café — 東京 🚀"
    d["annotations"][2]["caption"] = " ".join(["circle"] * 200)
    path.write_text(json.dumps(d, ensure_ascii=False))
    ds = data.CocoMultiTask(str(root), "val2017", tiny_cfg(), tokenizer, train=True)
    lo, hi = ds.vocab.task_range("cap")
    for i in range(3):
        t = ds[ds.ann.row(d["annotations"][i]["image_id"])][1]
        assert t["cap_seq"].shape == (tiny_cfg().max_captions, tiny_cfg().caption_len)
        assert ((t["cap_seq"] >= lo) & (t["cap_seq"] < hi)).all()
    assert evaluate.bleu4({1: ""}, {1: ["a red circle"]}) == pytest.approx(0.0, abs=1e-6)
    # 2 of 2 unigrams and 1 of 1 bigram match; no 3- or 4-grams: the scorer's constants give
    # (1e-15 / 1e-9)^0.5
    tiny, small = 1e-15, 1e-9
    assert evaluate.bleu4({1: "Ünïcödé café"}, {1: ["ünïcödé café"]}) == \
        pytest.approx(((2 + tiny) / (2 + small) * (1 + tiny) / (1 + small)
                       * (tiny / small) ** 2) ** 0.25, rel=1e-9)


def test_truncated_foreign_and_missing_checkpoints_give_clear_errors(synth, tokenizer, tmp_path):
    """Truncated, foreign and missing checkpoints stop with a clear message each."""
    ds = data.CocoMultiTask(synth, "val2017", tiny_cfg(), tokenizer, train=False)
    save_random_checkpoint(tmp_path / "c.pt", ds, tokenizer)
    blob = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SystemExit, match="cut.pt: cannot read the checkpoint"):
        runtime.load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="other.pt: not a MAD checkpoint"):
        runtime.load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        runtime.load_checkpoint(str(tmp_path / "none.pt"))


def test_evaluating_on_a_dataset_with_other_categories_is_refused(synth, tokenizer, tmp_path):
    """evaluate.py refuses a dataset whose categories differ from the checkpoint's, without a
    traceback."""
    ds = data.CocoMultiTask(synth, "val2017", tiny_cfg(), tokenizer, train=False)
    save_random_checkpoint(tmp_path / "c.pt", ds, tokenizer)
    root, _ = excerpt_root(tmp_path)
    p = run([sys.executable, "evaluate.py", str(tmp_path / "c.pt"), "--data", root,
             "--workers", "0", "--device", "cpu"], check=False)
    assert (p.returncode != 0 and "differ from the checkpoint's" in p.stderr
            and "Traceback" not in p.stderr)


def test_missing_coco_root_says_how_to_get_coco_or_use_demo(tmp_path):
    """A missing COCO root stops with how to download COCO 2017 or use python train.py --demo."""
    with pytest.raises(SystemExit, match=r"Download COCO 2017.*python train.py --demo"):
        data.check_root(str(tmp_path / "nowhere"), "train2017")
