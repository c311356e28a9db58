"""TensorFlow layer of the framework (work in progress)."""
import tensorflow.compat.v1 as tf
tf.disable_v2_behavior()
