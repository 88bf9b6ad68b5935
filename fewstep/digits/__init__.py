"""The bundled digits example: class-conditional and text-to-image teachers trained on scikit-learn's
handwritten digits, the feature nets that score them, and the library code of their training scripts.
Everything here runs offline; the weights live in ``fewstep/assets/``."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIGITS_TEACHER = ASSETS / "digits_teacher"          # class-conditional pixel UNet2DModel (the default teacher)
DIGITS_T2I_TEACHER = ASSETS / "digits_t2i_teacher"  # text-to-image UNet2DConditionModel (IFPipeline)
DIGITS_T2I_NAME = "digits_t2i"                      # model.teacher value that assembles the t2i teacher
DIGITS_NET = ASSETS / "digits_net"                  # the FD-digits feature network
DIGITS_NET2 = ASSETS / "digits_net2"                # the second, independently trained feature network
