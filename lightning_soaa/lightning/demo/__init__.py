"""Models and data that ship offline, for the main job, the CLI configs and the tests.

* :class:`DigitsDataModule` + :class:`DigitsMLP`: scikit-learn's ``load_digits`` (1797 8x8 images).
* :class:`TopicsDataModule` + :class:`CharTransformer`: a character-level language model on the
  standard library's ``pydoc_data.topics`` text (~465k characters).

The modules define no ``configure_optimizers``: pass ``--optimizer`` to the ``lightning-soaa`` CLI, or use
:func:`lightning_soaa.lightning.factory.attach_optimizer`.
"""

from lightning_soaa.lightning.demo.data import DigitsDataModule, TopicsDataModule, topics_text, topics_vocab
from lightning_soaa.lightning.demo.models import CharTransformer, DigitsMLP

__all__ = ["DigitsDataModule", "TopicsDataModule", "DigitsMLP", "CharTransformer", "topics_text",
           "topics_vocab"]
