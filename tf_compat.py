"""TensorFlow, as every module of this project uses it: the TF1 graph-mode API of TensorFlow 2.

`from tf_compat import tf` is the only way a module here should reach TensorFlow. Switching v2
behaviour off has to happen once, before any graph is built, and importing this module is what
guarantees that ordering for every caller.
"""

import tensorflow.compat.v1 as tf

tf.disable_v2_behavior()
