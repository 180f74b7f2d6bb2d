"""Graph passes: one module per transformation, plus the pipeline that orders them."""
