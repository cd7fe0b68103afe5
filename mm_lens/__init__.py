"""mm_lens: multimodal LLMs as first-class citizens of TransformerLens.

The public face: load a model (``HookedMLLM``), build batches (``MultimodalBatch``,
``ModalityMap``), and the analyses' entry points. The rest lives in the layer folders
(``base``, ``model``, ``neurons``, ``analysis``, ``presentation``; see docs/architecture.md).
"""

from mm_lens.base.compat import warn_if_untested

warn_if_untested()  # first: an untested transformers may break the imports below

from mm_lens.analysis.attention import attention_to_modalities, knockout_effect, knockout_hooks  # noqa: E402
from mm_lens.analysis.convergence import analyze_convergence  # noqa: E402
from mm_lens.analysis.direct_attribution import DirectAttribution, direct_logit_attribution  # noqa: E402
from mm_lens.analysis.answers import score_answers  # noqa: E402
from mm_lens.analysis.dose_response import DoseResponse, dose_response  # noqa: E402
from mm_lens.analysis.evaluation import evaluate_cross_domain  # noqa: E402
from mm_lens.analysis.lens import logit_lens, logit_lens_summary  # noqa: E402
from mm_lens.analysis.patching import attribution_patch, layer_agreement, patch_sweep, with_inputs  # noqa: E402
from mm_lens.base.data import check_samples, load_default_samples, load_samples  # noqa: E402
from mm_lens.base.hooks import block_hook, encoder_filter, language_model_filter  # noqa: E402
from mm_lens.base.modality import MODALITIES, POSITIONS, ImageLayout, ModalityMap, position_mask  # noqa: E402
from mm_lens.model.architectures import ARCHITECTURES, UnsupportedArchitectureError  # noqa: E402
from mm_lens.model.generation import Generation  # noqa: E402
from mm_lens.model.hooked import HookedMLLM  # noqa: E402
from mm_lens.model.inputs import MultimodalBatch  # noqa: E402
from mm_lens.model.samples import first_per_domain  # noqa: E402
from mm_lens.model.regions import RegionPositions, region_positions  # noqa: E402
from mm_lens.neurons.collection import collect_neuron_stats  # noqa: E402
from mm_lens.neurons.deactivation import Deactivation, deactivated, deactivation_hooks  # noqa: E402
from mm_lens.neurons.domain_neurons import select_domain_neurons  # noqa: E402
from mm_lens.neurons.modality_neurons import collect_miner_scores, select_modality_neurons  # noqa: E402
from mm_lens.neurons.neuron_set import NeuronSet  # noqa: E402
from mm_lens.pipelines import counterfactual_pair  # noqa: E402
from mm_lens.presentation.attention_view import attention_view  # noqa: E402
from mm_lens.presentation.visualize import attribution_heatmaps, heatmap_for, patching_pictures  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "Deactivation",
    "DirectAttribution",
    "DoseResponse",
    "Generation",
    "HookedMLLM",
    "ImageLayout",
    "MODALITIES",
    "ModalityMap",
    "MultimodalBatch",
    "NeuronSet",
    "POSITIONS",
    "RegionPositions",
    "UnsupportedArchitectureError",
    "analyze_convergence",
    "attention_to_modalities",
    "attribution_heatmaps",
    "attribution_patch",
    "attention_view",
    "block_hook",
    "check_samples",
    "collect_miner_scores",
    "collect_neuron_stats",
    "counterfactual_pair",
    "deactivated",
    "deactivation_hooks",
    "direct_logit_attribution",
    "dose_response",
    "encoder_filter",
    "evaluate_cross_domain",
    "first_per_domain",
    "heatmap_for",
    "patching_pictures",
    "knockout_effect",
    "knockout_hooks",
    "language_model_filter",
    "layer_agreement",
    "load_default_samples",
    "load_samples",
    "logit_lens",
    "logit_lens_summary",
    "patch_sweep",
    "position_mask",
    "region_positions",
    "score_answers",
    "select_domain_neurons",
    "select_modality_neurons",
    "with_inputs",
]
