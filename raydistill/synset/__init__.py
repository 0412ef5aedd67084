"""The synthetic set: its learnable tensors, initialisation, the meta-update and Boost-DD's blocks."""
