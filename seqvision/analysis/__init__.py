"""Analysis tools of the paper (Sec. 4.5 and its appendix), each also a ``seqvision`` command:

- ``resolution`` (``seqvision resolution-sweep``): accuracy at input sizes other than the training size.
- ``robustness`` (``seqvision robustness``): ImageNet-C CE / mCE, ImageNet-A, -R, -Sketch.
- ``adversarial`` (``seqvision adversarial``): FGSM and L-inf PGD robust accuracy.
- ``erf`` (``seqvision erf``): effective receptive fields as heat maps.

Submodules are imported on use, so importing ``seqvision.analysis`` costs nothing.
"""
