"""SUREID: occluded person re-identification with hierarchical token sparsification.

The public API, re-exported; see docs/index.md.
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoImageProcessor, AutoModel

# Importing the zoo and the model cards registers their checkpoint hooks (zoo ids in
# from_pretrained, the default card in save_pretrained): see register_checkpoint_hooks.
from . import model_card as _model_card  # noqa: E402, F401
from . import zoo as _zoo  # noqa: E402, F401
from .configuration_sureid import (
    SureidConfig,
    SureidError,
    SureidStudentConfig,
    SureidTeacherConfig,
)
from .evaluation import (
    ModelEvaluation,
    ReidMetrics,
    evaluate_model,
    evaluate_reid,
    protocol_for_dataset,
    re_rank,
)
from .gallery import GalleryIndex, SearchResult
from .image_processing_sureid import SureidImageProcessor, load_image
from .inference import (  # importing it registers the "sureid-feature-extraction" pipeline
    FeatureResult,
    SkippedInput,
    SureidFeatureExtractionPipeline,
    extract_features,
)
from .modeling_sureid import (
    SureidModel,
    SureidModelOutput,
    SureidPreTrainedModel,
    SureidStudentModel,
    SureidTeacherModel,
    TokenPredictor,
)

for _config_cls, _model_cls in (
    (SureidTeacherConfig, SureidTeacherModel),
    (SureidStudentConfig, SureidStudentModel),
):
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModel.register(_config_cls, _model_cls, exist_ok=True)
    AutoImageProcessor.register(
        _config_cls, fast_image_processor_class=SureidImageProcessor, exist_ok=True
    )

__all__ = [
    "__version__",
    "SureidConfig",
    "SureidError",
    "SureidImageProcessor",
    "SureidModel",
    "SureidModelOutput",
    "SureidPreTrainedModel",
    "SureidStudentConfig",
    "SureidStudentModel",
    "SureidTeacherConfig",
    "SureidTeacherModel",
    "TokenPredictor",
    "load_image",
    "FeatureResult",
    "GalleryIndex",
    "ModelEvaluation",
    "ReidMetrics",
    "SearchResult",
    "SkippedInput",
    "SureidFeatureExtractionPipeline",
    "evaluate_model",
    "evaluate_reid",
    "extract_features",
    "protocol_for_dataset",
    "re_rank",
]
