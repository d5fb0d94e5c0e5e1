{{/* The chart's name, overridable. */}}
{{- define "beemesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, with the chart name unless it already has it. */}}
{{- define "beemesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "beemesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beemesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "beemesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "beemesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "beemesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "beemesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the mesh identity key, if any. */}}
{{- define "beemesh.identitySecret" -}}
{{- if .Values.identity.existingSecret }}
{{- .Values.identity.existingSecret }}
{{- else if .Values.identity.create }}
{{- printf "%s-identity" (include "beemesh.fullname" .) }}
{{- end }}
{{- end }}

{{- define "beemesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the node's join tokens and enrolled agents. */}}
{{- define "beemesh.trustSecret" -}}
{{- default (printf "%s-trust" (include "beemesh.fullname" .)) .Values.trust.existingSecret }}
{{- end }}
