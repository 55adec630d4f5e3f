"""ActDistill: Ray-based distributed distillation of Vision-Language-Action policies into routed students."""
