"""Memory savers for long sequences, wired by prepare_model from the config: the chunked causal-LM loss
(no tokens x vocab logits), the sequence-chunked MLP (no tokens x intermediate activations) and the
offload of checkpointed layer inputs to pinned CPU memory; expandable segments for the CUDA allocator."""
from .allocator import use_expandable_segments
from .chunked_loss import chunked_cross_entropy, enable_chunked_loss
from .chunked_mlp import enable_chunked_mlp
from .offload import enable_activation_offload

__all__ = ["chunked_cross_entropy", "enable_activation_offload", "enable_chunked_loss", "enable_chunked_mlp",
           "use_expandable_segments"]
