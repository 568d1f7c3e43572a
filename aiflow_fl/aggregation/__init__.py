"""Aggregation of aligned low-rank updates: pure tensor math, no Flower, files or networks."""

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors, from_peft_state_dict, to_peft_state_dict

__all__ = ["AdapterUpdate", "LoraFactors", "from_peft_state_dict", "to_peft_state_dict"]
