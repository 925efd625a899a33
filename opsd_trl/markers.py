"""Text markers of the chat formats, shared by the sampler, the config defaults and the models."""

# The literal text after which a Visual-OPSD student may "draw" a visual thought (ThinkMorph's interleaved traces):
# a generation round ending on EOS whose text holds it gets one more round (image-skip rounds, docs/generation.md).
# Plain text in the checkpoints' vocabularies, never a special token.
IMAGE_SKIP_MARKER = "<image_start>"
