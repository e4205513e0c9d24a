from simclr_tau.models.encoder import build_encoder, encoder_state_dict, load_encoder_weights
from simclr_tau.models.heads import mlp, out_bn_for

__all__ = ["build_encoder", "encoder_state_dict", "load_encoder_weights", "mlp", "out_bn_for"]
