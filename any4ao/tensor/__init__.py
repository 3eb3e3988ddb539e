"""The Any4Tensor subclass, its bit packing and the aten ops it implements."""
