"""The merger: recipes, parameter layout, merge methods and the in-place materializer."""

from merging.layout import ModelLayout
from merging.materializer import Materializer
from merging.methods import METHODS, get_method
from merging.parents import Parents
from merging.recipe import MergeRecipe

__all__ = ["METHODS", "Materializer", "MergeRecipe", "ModelLayout", "Parents", "get_method"]
