"""Tokenizer training and encoding (sentencepiece BPE with byte fallback).

Independent of `pretrain`: it takes any iterator of documents."""

from tokenizer.core import Tokenizer
from tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "train_tokenizer"]
