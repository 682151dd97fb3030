"""The model card written by `diffrl push`: its usage snippet for masked LMs that ship their own code."""

from diffrl.model_card import model_card


def test_remote_code_models_are_loaded_with_automodel_and_trust_remote_code(tmp_path):
    config = {"trainer": "igpo", "model": {"path": "GSAI-ML/LLaDA-8B-Instruct", "trust_remote_code": True},
              "lora": {"enabled": True}}
    card = model_card(config, tmp_path, repo_id="me/llada-igpo", weights="raw", step=10)
    assert ('PeftModel.from_pretrained(AutoModel.from_pretrained("GSAI-ML/LLaDA-8B-Instruct", '
            'trust_remote_code=True), "me/llada-igpo")') in card
    assert "AutoModelForMaskedLM" not in card
    config["model"]["trust_remote_code"] = False  # a native masked LM keeps AutoModelForMaskedLM
    assert 'AutoModelForMaskedLM.from_pretrained("GSAI-ML/LLaDA-8B-Instruct")' in model_card(
        config, tmp_path, repo_id="me/x", weights="raw", step=None)
