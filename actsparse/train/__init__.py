"""Training-time sparsity: relufication and the self-distillation fine-tune that recovers it.

    student, plan = actsparse.relufy(copy.deepcopy(model), "relu")
    result = distill(student, model, DistillConfig(steps=200))
    save_adapters(student, "adapters.safetensors", info=plan.info)
    # later: model, plan = rebuild(base_model, "adapters.safetensors")
"""

from .distill import DistillConfig, DistillResult, distill, held_out_kl, kl_teacher_student, sample_sequences
from .lora import ALL_TARGETS, add_lora, load_adapters, lora_modules, merge_lora, read_adapters, rebuild, save_adapters
from .moe_finetune import MoeFinetuneConfig, finetune_moe, load_finetuned, save_finetuned
from .relufy import VARIANTS, ZeroCounter, gated_mlps, mlp_sparsity, relufy, with_input_thresholds

__all__ = ["ALL_TARGETS", "DistillConfig", "DistillResult", "MoeFinetuneConfig", "finetune_moe", "load_finetuned",
           "save_finetuned", "VARIANTS", "ZeroCounter", "add_lora", "distill", "gated_mlps", "held_out_kl",
           "kl_teacher_student", "load_adapters", "lora_modules", "merge_lora", "mlp_sparsity", "read_adapters",
           "rebuild", "relufy", "sample_sequences", "save_adapters", "with_input_thresholds"]
