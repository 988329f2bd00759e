"""The papers tokendrop implements, with the short names the configs' ``reproduces`` lines start with.

Only what the documents themselves state is given: a year or a link is empty where a document names none.
"""

from __future__ import annotations

from dataclasses import dataclass

PTD_REPO = "https://github.com/aumkeshchaudhary/Progressive-Token-Drop-ViT"


@dataclass(frozen=True)
class Paper:
    key: str
    title: str
    authors: str
    venue: str = ""
    year: str = ""
    link: str = ""

    def citation(self) -> str:
        """``authors, "title", venue year. link`` (the parts a document does not state are left out)."""
        where = ", ".join(p for p in (self.venue, self.year) if p)
        return f'{self.authors}, "{self.title}"' + (f", {where}" if where else "") + (f". {self.link}" if self.link else "")


PAPERS = (
    Paper("PTD report (Chaudhary)",
          "Progressive Token Drop for Efficient Vision Transformers: Baseline vs PTD on CIFAR-100",
          "Aumkesh Chaudhary", "report (IIT Patna)", link=f"{PTD_REPO} (PTD_Report.pdf)"),
    Paper("CTD (Chaudhary 2024)", "Curriculum Token Drop: Training-Efficient Vision Transformers",
          "Aumkesh Chaudhary", "README", "2024", f"{PTD_REPO} (README.md)"),
    Paper("TNT (Rao et al. 2024)", "Training Noise Token Pruning", "Mingxing Rao, Bohan Jiang, Daniel Moyer",
          "arXiv:2411.18092", "2024", "https://arxiv.org/abs/2411.18092"),
    Paper("TPC-ViT (Zhu)", "TPC-ViT: Token Propagation Controller for Efficient Vision Transformers", "Wentao Zhu"),
    Paper("Which Tokens to Use? (Haurum et al.)",
          "Which Tokens to Use? Investigating Token Reduction in Vision Transformers",
          "Joakim Bruslund Haurum, Sergio Escalera, Graham W. Taylor, Thomas B. Moeslund",
          link="https://vap.aau.dk/tokens"),
)
"""Every paper, in the order of the README's table."""
